/* AES-128 counter mode and HMAC-SHA1 for libsrtp, with their OpenSSL state kept
 * initialised across packets.
 *
 * Why: libsrtp re-initialises its crypto per packet. Its OpenSSL backend calls
 * EVP_EncryptInit_ex to set each packet's IV and EVP_MAC_init (or an EVP_MAC_CTX_dup)
 * to restart HMAC; its NSS backend (Debian's libsrtp2) creates a new PK11 context per
 * packet. That set-up costs several times the AES and SHA-1 work on a 172-byte packet
 * (docs/decisions.md). Here the AES key schedule lives in one ECB context made when the
 * key is set, and a packet's keystream is the encryption of its counter blocks in one
 * EVP_EncryptUpdate; HMAC keeps the SHA-1 states after the inner and outer pads, and a
 * packet copies them. The algorithms are libsrtp's own (RFC 3711 AES-CM, RFC 2104 HMAC):
 * libsrtp installs them through its public srtp_replace_cipher_type /
 * srtp_replace_auth_type only after they pass its self tests and ours. */

#define OPENSSL_SUPPRESS_DEPRECATED 1 /* SHA1_Init & co: the one API that copies cheaply */
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <srtp2/auth.h>
#include <srtp2/cipher.h>
#include <srtp2/srtp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastcrypto.h"

#define ICM_KEY 16
#define ICM_SALT 14
#define ICM_KEY_WSALT (ICM_KEY + ICM_SALT)
#define CHUNK_BLOCKS 32

typedef struct {
    EVP_CIPHER_CTX *ecb;
    uint8_t offset[16];  /* salt || 0x0000 */
    uint8_t counter[16]; /* next counter block */
    uint8_t keystream[16];
    unsigned left; /* unused keystream bytes at the end of keystream[] */
} icm_state;

static const srtp_cipher_type_t icm_type;
static const srtp_auth_type_t hmac_type;

static void wipe(void *p, size_t n)
{
    explicit_bzero(p, n);
}

static srtp_err_status_t icm_alloc(srtp_cipher_t **cp, int key_len, int tag_len)
{
    (void)tag_len;
    if (key_len != ICM_KEY_WSALT)
        return srtp_err_status_bad_param;
    srtp_cipher_t *c = calloc(1, sizeof *c);
    icm_state *s = calloc(1, sizeof *s);
    if (c == NULL || s == NULL || (s->ecb = EVP_CIPHER_CTX_new()) == NULL) {
        free(c);
        free(s);
        return srtp_err_status_alloc_fail;
    }
    c->type = &icm_type;
    c->state = s;
    c->key_len = key_len;
    c->algorithm = SRTP_AES_ICM_128;
    *cp = c;
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_dealloc(srtp_cipher_t *c)
{
    if (c == NULL)
        return srtp_err_status_bad_param;
    icm_state *s = c->state;
    if (s != NULL) {
        EVP_CIPHER_CTX_free(s->ecb);
        wipe(s, sizeof *s);
        free(s);
    }
    free(c);
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_init(void *state, const uint8_t *key)
{
    icm_state *s = state;
    memset(s->offset, 0, sizeof s->offset);
    memcpy(s->offset, key + ICM_KEY, ICM_SALT);
    memcpy(s->counter, s->offset, 16);
    s->left = 0;
    if (!EVP_EncryptInit_ex(s->ecb, EVP_aes_128_ecb(), NULL, key, NULL) ||
        !EVP_CIPHER_CTX_set_padding(s->ecb, 0))
        return srtp_err_status_cipher_fail;
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_set_iv(void *state, uint8_t *iv, srtp_cipher_direction_t dir)
{
    icm_state *s = state;
    (void)dir;
    for (int i = 0; i < 16; i++)
        s->counter[i] = s->offset[i] ^ iv[i];
    s->left = 0;
    return srtp_err_status_ok;
}

static unsigned block_index(const icm_state *s)
{
    return ((unsigned)s->counter[14] << 8) | s->counter[15];
}

static void advance(icm_state *s)
{
    if (++s->counter[15] == 0)
        ++s->counter[14];
}

/* buf ^= stream, eight bytes at a time (the compiler cannot tell they do not overlap) */
static void xor_into(uint8_t *restrict buf, const uint8_t *restrict stream, unsigned n)
{
    unsigned i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, buf + i, 8);
        memcpy(&b, stream + i, 8);
        a ^= b;
        memcpy(buf + i, &a, 8);
    }
    for (; i < n; i++)
        buf[i] ^= stream[i];
}

static srtp_err_status_t icm_encrypt(void *state, uint8_t *buf, unsigned int *len)
{
    icm_state *s = state;
    unsigned n = *len;
    /* libsrtp's limit: the 16-bit block counter must not wrap within one IV */
    unsigned fresh = n > s->left ? n - s->left : 0;
    if ((fresh + 15) / 16 + block_index(s) > 0xffff)
        return srtp_err_status_terminus;
    while (n > 0 && s->left > 0) {
        *buf++ ^= s->keystream[16 - s->left];
        s->left--;
        n--;
    }
    uint8_t blocks[CHUNK_BLOCKS * 16];
    uint8_t stream[CHUNK_BLOCKS * 16];
    unsigned used = 0;
    while (n > 0) {
        unsigned count = (n + 15) / 16;
        if (count > CHUNK_BLOCKS)
            count = CHUNK_BLOCKS;
        for (unsigned b = 0; b < count; b++) {
            memcpy(blocks + 16 * b, s->counter, 16);
            advance(s);
        }
        int out = 0;
        if (!EVP_EncryptUpdate(s->ecb, stream, &out, blocks, (int)(16 * count)) ||
            out != (int)(16 * count))
            return srtp_err_status_cipher_fail;
        used = 16 * count;
        unsigned take = 16 * count < n ? 16 * count : n;
        xor_into(buf, stream, take);
        buf += take;
        n -= take;
        if (take < 16 * count) { /* keep the rest of the last block for the next call */
            s->left = 16 * count - take;
            memcpy(s->keystream + 16 - s->left, stream + take, s->left);
        }
    }
    if (used)
        wipe(stream, used);
    return srtp_err_status_ok;
}

typedef struct {
    SHA_CTX inner; /* after the key XOR ipad block */
    SHA_CTX outer; /* after the key XOR opad block */
    SHA_CTX now;   /* the packet being authenticated */
} hmac_state;

static srtp_err_status_t hmac_alloc(srtp_auth_t **ap, int key_len, int out_len)
{
    if (out_len > SHA_DIGEST_LENGTH || out_len < 0 || key_len < 0 || key_len > 64)
        return srtp_err_status_bad_param;
    srtp_auth_t *a = calloc(1, sizeof *a);
    hmac_state *s = calloc(1, sizeof *s);
    if (a == NULL || s == NULL) {
        free(a);
        free(s);
        return srtp_err_status_alloc_fail;
    }
    a->type = &hmac_type;
    a->state = s;
    a->out_len = out_len;
    a->key_len = key_len;
    a->prefix_len = 0;
    *ap = a;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_dealloc(srtp_auth_t *a)
{
    if (a == NULL)
        return srtp_err_status_bad_param;
    if (a->state != NULL) {
        wipe(a->state, sizeof(hmac_state));
        free(a->state);
    }
    wipe(a, sizeof *a);
    free(a);
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_init(void *state, const uint8_t *key, int key_len)
{
    hmac_state *s = state;
    uint8_t pad[64];
    if (key_len < 0 || key_len > 64)
        return srtp_err_status_bad_param;
    memset(pad, 0x36, sizeof pad);
    for (int i = 0; i < key_len; i++)
        pad[i] ^= key[i];
    if (!SHA1_Init(&s->inner) || !SHA1_Update(&s->inner, pad, 64))
        return srtp_err_status_auth_fail;
    memset(pad, 0x5c, sizeof pad);
    for (int i = 0; i < key_len; i++)
        pad[i] ^= key[i];
    if (!SHA1_Init(&s->outer) || !SHA1_Update(&s->outer, pad, 64))
        return srtp_err_status_auth_fail;
    wipe(pad, sizeof pad);
    s->now = s->inner;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_start(void *state)
{
    hmac_state *s = state;
    s->now = s->inner;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_update(void *state, const uint8_t *msg, int len)
{
    hmac_state *s = state;
    if (len < 0 || !SHA1_Update(&s->now, msg, (size_t)len))
        return srtp_err_status_auth_fail;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_compute(void *state, const uint8_t *msg, int len, int tag_len,
                                      uint8_t *tag)
{
    hmac_state *s = state;
    uint8_t digest[SHA_DIGEST_LENGTH];
    if (tag_len < 0 || tag_len > SHA_DIGEST_LENGTH || len < 0)
        return srtp_err_status_bad_param;
    if (!SHA1_Update(&s->now, msg, (size_t)len) || !SHA1_Final(digest, &s->now))
        return srtp_err_status_auth_fail;
    SHA_CTX outer = s->outer;
    if (!SHA1_Update(&outer, digest, sizeof digest) || !SHA1_Final(digest, &outer))
        return srtp_err_status_auth_fail;
    memcpy(tag, digest, (size_t)tag_len);
    wipe(&outer, sizeof outer);
    return srtp_err_status_ok;
}

/* RFC 3711 appendix B.2: AES-CM test vector (key, salt; IV 0; the first 3 blocks). */
static const uint8_t icm_key[ICM_KEY_WSALT] = {
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f,
    0x3c, 0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd};
static uint8_t icm_idx[16] = {0};
static const uint8_t icm_plain[48] = {0};
static const uint8_t icm_cipher[48] = {
    0xe0, 0x3e, 0xad, 0x09, 0x35, 0xc9, 0x5e, 0x80, 0xe1, 0x66, 0xb1, 0x6d, 0xd9, 0x2b, 0x4e,
    0xb4, 0xd2, 0x35, 0x13, 0x16, 0x2b, 0x02, 0xd0, 0xf7, 0x2a, 0x43, 0xa2, 0xfe, 0x4a, 0x5f,
    0x97, 0xab, 0x41, 0xe9, 0x5b, 0x3b, 0xb0, 0xa2, 0xe8, 0xdd, 0x47, 0x79, 0x01, 0xe4, 0xfc,
    0xa8, 0x94, 0xc0};
static const srtp_cipher_test_case_t icm_test = {
    ICM_KEY_WSALT, icm_key, icm_idx, 48, icm_plain, 48, icm_cipher, 0, NULL, 0, NULL};

/* RFC 2202 test case 2 (HMAC-SHA1, key "Jefe"). */
static const uint8_t hmac_key[4] = {'J', 'e', 'f', 'e'};
static const uint8_t hmac_data[28] = "what do ya want for nothing?";
static const uint8_t hmac_tag[20] = {0xef, 0xfc, 0xdf, 0x6a, 0xe5, 0xeb, 0x2f, 0xa2, 0xd2, 0x74,
                                     0x16, 0xd5, 0xf1, 0x84, 0xdf, 0x9c, 0x25, 0x9a, 0x7c, 0x79};
static const srtp_auth_test_case_t hmac_test = {4, hmac_key, 28, hmac_data, 20, hmac_tag, NULL};

static const srtp_cipher_type_t icm_type = {
    icm_alloc, icm_dealloc, icm_init,   NULL, icm_encrypt, icm_encrypt, icm_set_iv,
    NULL,      "AES-128 counter mode, OpenSSL ECB context kept (sipura-proxy)", &icm_test,
    SRTP_AES_ICM_128};

static const srtp_auth_type_t hmac_type = {
    hmac_alloc, hmac_dealloc, hmac_init, hmac_compute, hmac_update, hmac_start,
    "HMAC-SHA1, pad states kept (sipura-proxy)", &hmac_test, SRTP_HMAC_SHA1};

int fastcrypto_install(void)
{
    if (srtp_replace_cipher_type(&icm_type, SRTP_AES_ICM_128) != srtp_err_status_ok)
        return -1;
    if (srtp_replace_auth_type(&hmac_type, SRTP_HMAC_SHA1) != srtp_err_status_ok)
        return -2;
    return 0;
}
