/* AES-128 counter mode and HMAC-SHA1 for libsrtp, with their OpenSSL state kept
 * initialised across packets (see fastcrypto.c). */
#ifndef SIPURA_FASTCRYPTO_H
#define SIPURA_FASTCRYPTO_H

/* Replace libsrtp's AES_ICM_128 cipher and HMAC_SHA1 auth implementations with ours.
 * libsrtp runs its own self tests and ours before it accepts them. Call after
 * srtp_init(). Returns 0 on success; on failure libsrtp keeps its own (slower) ones. */
int fastcrypto_install(void);

#endif
