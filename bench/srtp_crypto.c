/* srtp_crypto: per-packet cost of the system libsrtp2, with its own crypto and with the
 * kept-state AES-CM / HMAC-SHA1 of csrc/fastcrypto.c (docs/decisions.md, entry 54).
 * Built and run by bench/srtp_crypto.py: srtp_crypto [kept] [packets] */
#include <srtp2/srtp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fastcrypto.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    int kept = argc > 1 && strcmp(argv[1], "kept") == 0;
    long packets = argc > 2 ? atol(argv[2]) : 200000;
    if (srtp_init() != srtp_err_status_ok || (kept && fastcrypto_install() != 0)) {
        fprintf(stderr, "libsrtp set-up failed\n");
        return 2;
    }
    unsigned char key[30];
    for (int i = 0; i < 30; i++)
        key[i] = (unsigned char)(i * 7 + 1);
    srtp_policy_t policy;
    memset(&policy, 0, sizeof policy);
    srtp_crypto_policy_set_rtp_default(&policy.rtp);
    srtp_crypto_policy_set_rtcp_default(&policy.rtcp);
    policy.key = key;
    srtp_t out, in;
    policy.ssrc.type = ssrc_any_outbound;
    if (srtp_create(&out, &policy))
        return 2;
    policy.ssrc.type = ssrc_any_inbound;
    if (srtp_create(&in, &policy))
        return 2;
    unsigned char buf[256];
    double protect = 0, unprotect = 0;
    for (long i = 0; i < packets; i++) {
        memset(buf, 0xd5, 172);
        buf[0] = 0x80;
        buf[2] = (unsigned char)(i >> 8);
        buf[3] = (unsigned char)i;
        buf[8] = 1;
        int len = 172;
        double t0 = now();
        if (srtp_protect(out, buf, &len))
            return 2;
        double t1 = now();
        if (srtp_unprotect(in, buf, &len) || len != 172 || buf[100] != 0xd5)
            return 2;
        protect += t1 - t0;
        unprotect += now() - t1;
    }
    printf("{\"crypto\": \"%s\", \"protect_us\": %.3f, \"unprotect_us\": %.3f, \"libsrtp\": \"%s\"}\n",
           kept ? "kept" : "libsrtp", protect / packets * 1e6, unprotect / packets * 1e6,
           srtp_get_version_string());
    return 0;
}
