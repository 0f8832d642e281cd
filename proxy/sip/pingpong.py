"""RFC 5626 §4.4.1 keep-alive over a stream: the client's ping is CRLF CRLF between
messages, and the server answers each with a single CRLF (the pong).

A phone behind NAT keeps its TCP flow (and the NAT binding under it) alive this way and
takes a missing pong as a dead flow, to register again. Sans-IO: the connection's receive
buffer in, the number of pongs owed out.
"""

from __future__ import annotations

PING = b"\r\n\r\n"
PONG = b"\r\n"


def take_pings(buffer: bytearray) -> int:
    """Remove the complete pings at the front of ``buffer`` (a message boundary) and
    return how many there were. A lone CRLF is left: it may be half of a ping whose
    other half is still on the way (or a stray line end the framer skips)."""
    count = 0
    while buffer.startswith(PING):
        del buffer[:4]
        count += 1
    return count
