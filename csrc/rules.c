/* The relay's packet rules (see rules.h): a line-by-line port of the Python functions,
 * which stay the reference (tests/media/test_packet_rules.py checks both on arbitrary
 * bytes). */
#include "rules.h"

#include <string.h>

static unsigned u16(const uint8_t *p) { return ((unsigned)p[0] << 8) | p[1]; }

static uint32_t u32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

int rtp_shaped(const uint8_t *data, size_t size)
{
    if (size < 12)
        return 0;
    unsigned first = data[0], pt = data[1] & 0x7F;
    if (first >> 6 != 2 || (pt >= 72 && pt <= 76))
        return 0;
    size_t end = 12 + 4 * (size_t)(first & 0x0F);
    if (first & 0x10) {
        if (size < end + 4)
            return 0;
        end += 4 + 4 * (size_t)u16(data + end + 2);
    }
    if (end > size)
        return 0;
    if (!(first & 0x20))
        return 1;
    unsigned pad = data[size - 1];
    return pad > 0 && pad <= size - end;
}

void plain_reference(const uint8_t *data, size_t size, long long *ssrc, long long *seq)
{
    if (!rtp_shaped(data, size)) {
        *ssrc = *seq = -1;
        return;
    }
    *ssrc = u32(data + 8);
    *seq = u16(data + 2);
}

enum refusal refuse_plain_rtp(const uint8_t *data, size_t size, long long ssrc, long long seq)
{
    if (!rtp_shaped(data, size))
        return REFUSE_NOT_RTP;
    if (ssrc < 0)
        return REFUSE_NONE;
    if ((int64_t)u32(data + 8) != ssrc)
        return REFUSE_WRONG_SSRC;
    /* Python: (seq_now - seq) & 0xFFFF with seq possibly -1 (no reference sequence) */
    int64_t ahead = ((int64_t)u16(data + 2) - seq) & 0xFFFF;
    if (ahead < 1 || ahead > SEQ_AHEAD)
        return REFUSE_BAD_SEQUENCE;
    return REFUSE_NONE;
}

enum refusal refuse_plain_rtcp(const uint8_t *data, size_t size, long long ssrc)
{
    if (!valid_compound(data, size))
        return REFUSE_NOT_RTP;
    /* a valid compound is at least 4 bytes; Python's int.from_bytes(data[4:8]) reads what
     * there is of bytes 4-7 */
    if (ssrc >= 0) {
        uint64_t value = 0;
        for (size_t i = 4; i < 8 && i < size; i++)
            value = (value << 8) | data[i];
        if ((int64_t)value != ssrc)
            return REFUSE_WRONG_SSRC;
    }
    return REFUSE_NONE;
}

/* rtcp._MIN_WORDS: the smallest length field of each known type, -1: unknown type */
static long min_words(unsigned kind, unsigned count)
{
    switch (kind) {
    case 200:
        return 6 + 6 * (long)count;
    case 201:
        return 1 + 6 * (long)count;
    case 202:
        return 2 * (long)count;
    case 203:
        return (long)count;
    case 204:
        return 2;
    default:
        return -1;
    }
}

int valid_compound(const uint8_t *data, size_t size)
{
    if (size < 4 || (data[0] & 0xE0) != 0x80 || data[1] < 200 || data[1] > 207)
        return 0;
    size_t pos = 0;
    while (pos < size) {
        if (size - pos < 4)
            return 0;
        unsigned first = data[pos], kind = data[pos + 1];
        size_t words = u16(data + pos + 2);
        size_t end = pos + 4 + 4 * words;
        if (first >> 6 != 2 || kind < 192 || kind > 223 || end > size)
            return 0;
        long minimal = min_words(kind, first & 0x1F);
        size_t used = minimal < 0 ? 0 : 4 * (size_t)minimal;
        if (first & 0x20) {
            unsigned pad = end > pos + 4 ? data[end - 1] : 0;
            if (end != size || pad == 0 || pad % 4 || used + pad > 4 * words)
                return 0;
        } else if (used > 4 * words) {
            return 0;
        }
        pos = end;
    }
    return 1;
}

size_t clear_compound(uint8_t *data, size_t size, long long *stripped)
{
    size_t pos = 0, out = 0;
    *stripped = 0;
    while (pos + 4 <= size) {
        unsigned first = data[pos], kind = data[pos + 1];
        size_t words = u16(data + pos + 2);
        size_t end = pos + 4 + 4 * words;
        if (end > size) /* not after valid_compound; never read past the end anyway */
            break;
        if (kind < 200 || kind > 203) {
            (*stripped)++;
        } else {
            size_t body;
            if (kind == 200 || kind == 201) /* the report blocks, not the extension */
                body = 4 * (size_t)min_words(kind, first & 0x1F);
            else
                body = 4 * words - ((first & 0x20) ? data[end - 1] : 0);
            if (body > 4 * words) /* not after valid_compound */
                body = 4 * words;
            if (body == 4 * words && !(first & 0x20)) {
                memmove(data + out, data + pos, end - pos);
                out += end - pos;
            } else {
                (*stripped)++;
                uint8_t header[4] = {(uint8_t)(first & 0xDF), (uint8_t)kind,
                                     (uint8_t)((body / 4) >> 8), (uint8_t)(body / 4)};
                memmove(data + out + 4, data + pos + 4, body);
                memcpy(data + out, header, 4);
                out += 4 + body;
            }
        }
        pos = end;
    }
    return *stripped ? out : size;
}

int plain_rtp(const uint8_t *data, size_t size)
{
    if (size < 12 || data[0] >> 6 != 2)
        return 0;
    size_t end = 12 + 4 * (size_t)(data[0] & 0x0F);
    if (data[0] & 0x10) {
        if (size < end + 4)
            return 0;
        end += 4 + 4 * (size_t)u16(data + end + 2);
    }
    return end <= size;
}

int plain_rtcp(const uint8_t *data, size_t size)
{
    size_t pos = 0;
    while (pos + 4 <= size) {
        if (data[pos] >> 6 != 2 || data[pos + 1] < 192 || data[pos + 1] > 223)
            return 0;
        pos += 4 + 4 * (size_t)u16(data + pos + 2);
    }
    return pos == size && size > 0;
}
