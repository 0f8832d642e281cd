/* The relay's packet rules as pure C functions over (pointer, length): the same rules as
 * proxy/media/grace.py, proxy/media/rtcp.py and the shape checks of proxy/media/relay_leg.py,
 * which say why each rule exists. Every function reads only within [data, data + size). */
#ifndef SIPURA_RULES_H
#define SIPURA_RULES_H

#include <stddef.h>
#include <stdint.h>

#define SEQ_AHEAD 32 /* grace.SEQ_AHEAD */

/* Refusal reasons of the plain window (grace.py), 0: none. */
enum refusal { REFUSE_NONE = 0, REFUSE_NOT_RTP, REFUSE_WRONG_SSRC, REFUSE_BAD_SEQUENCE };

int rtp_shaped(const uint8_t *data, size_t size);
/* (ssrc, seq) of an RTP-shaped packet; both -1 otherwise. */
void plain_reference(const uint8_t *data, size_t size, long long *ssrc, long long *seq);
enum refusal refuse_plain_rtp(const uint8_t *data, size_t size, long long ssrc, long long seq);
enum refusal refuse_plain_rtcp(const uint8_t *data, size_t size, long long ssrc);
int valid_compound(const uint8_t *data, size_t size);
/* Rule C2 in place on a valid compound: the parts that may leave in the clear are moved
 * to the front; returns their length (0: nothing left) and the number of packets or
 * parts left out in *stripped. */
size_t clear_compound(uint8_t *data, size_t size, long long *stripped);
int plain_rtp(const uint8_t *data, size_t size);
int plain_rtcp(const uint8_t *data, size_t size);

#endif
