"""Cutting a TCP byte stream into SIP messages (RFC 3261 §18.3), sans-IO, in linear time.

One :class:`StreamFramer` per connection: :meth:`StreamFramer.feed` takes the bytes a
read returned and gives back every message they completed. Each byte is looked at a
bounded number of times however the stream is cut: the search for the blank line that
ends a header section resumes where the last one stopped (three bytes back, so that a
CRLF CRLF split across reads is found), a known Content-Length is never searched for
again, and consumed bytes are dropped from the buffer in amortised chunks. (Rescanning
the whole buffer on every read cost ~0.55 ms of CPU per one-byte segment once 60 KB of
an unfinished header had arrived.)

Size is capped at ``max_message`` (``[sip] max_message_bytes``): a header section that
grows past it raises :class:`~proxy.sip.message.MessageTooLarge` (nothing can be
answered: the connection must close), and a complete head whose Content-Length takes the
message past it is returned as :class:`Oversized` (the head, to answer 413) while its
body is skipped as it arrives, so the framing survives and nothing is buffered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.sip.message import MAX_MESSAGE, MessageTooLarge, blank_line, declared_length
from proxy.sip.pingpong import PING

__all__ = ["Frame", "Oversized", "StreamFramer"]

_KEEPALIVES = re.compile(rb"[\r\n]*")
"""Stray line ends between messages (RFC 3261 §7.5), once the pings are counted."""


@dataclass(frozen=True, slots=True)
class Oversized:
    """A message past the size cap; ``head`` is its header section (for a 413)."""

    head: bytes
    size: int


Frame = bytes | Oversized


class StreamFramer:
    """The receive side of one stream connection."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        self._start = 0
        """Where the message being framed starts in ``_buffer`` (bytes before: consumed)."""
        self._scan = 0
        """Where the next search for the end of the header section resumes."""
        self._total = 0
        """The size of the message being framed once its head is complete (0: not yet)."""
        self._skip = 0
        """Body bytes of an :class:`Oversized` message still to arrive and be dropped."""
        self._pings = 0
        """RFC 5626 keep-alive pings (CRLF CRLF between messages) not yet answered."""

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message: buffered, or still to skip. 0 between messages
        (keep-alives, and the first half of a ping still on its way, do not count)."""
        unread = len(self._buffer) - self._start
        if self._total == 0 and unread < len(PING) and self._ping_prefix():
            unread = 0
        return unread + self._skip

    def take_pings(self) -> int:
        """How many pings arrived since the last call: each is owed one CRLF (pong)."""
        pings, self._pings = self._pings, 0
        return pings

    def _ping_prefix(self) -> bool:
        return PING.startswith(bytes(self._buffer[self._start :]))

    def feed(self, data: bytes) -> list[Frame]:
        """The messages ``data`` completes, in order. Raises
        :class:`~proxy.sip.message.SipParseError` when the stream cannot be framed any
        more (no Content-Length, a malformed one, a header section past the cap): the
        connection must then be closed."""
        view = memoryview(data)
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            view = view[taken:]
        self._buffer += view
        frames: list[Frame] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        self._compact()
        return frames

    def _next(self) -> Frame | None:
        buffer = self._buffer
        if self._total == 0:
            while buffer.startswith(PING, self._start):  # RFC 5626 §4.4.1 keep-alive
                self._start += len(PING)
                self._pings += 1
            if len(buffer) - self._start < len(PING) and self._ping_prefix():
                return None  # maybe the first half of a ping: wait for the rest
            match = _KEEPALIVES.match(buffer, self._start)
            assert match is not None  # the pattern matches the empty string
            self._start = start = match.end()
            found = blank_line(buffer, max(self._scan, start))
            if found is None:
                if len(buffer) - start > self.max_message:
                    raise MessageTooLarge(f"header section of more than {self.max_message} bytes")
                self._scan = max(start, len(buffer) - 3)
                return None
            head_end, body_at = found
            head = bytes(buffer[start:head_end])
            total = body_at - start + declared_length(head)
            if total > self.max_message:
                return self._oversized(head, body_at, total)
            self._total = total
        if len(buffer) - self._start < self._total:
            return None
        message = bytes(buffer[self._start : self._start + self._total])
        self._start += self._total
        self._scan = self._start
        self._total = 0
        return message

    def _oversized(self, head: bytes, body_at: int, total: int) -> Oversized:
        body = total - (body_at - self._start)
        available = len(self._buffer) - body_at
        if available >= body:
            self._start = body_at + body
        else:
            self._start = len(self._buffer)
            self._skip = body - available
        self._scan = self._start
        return Oversized(head, total)

    def _compact(self) -> None:
        """Drop consumed bytes once they are at least half the buffer (amortised O(1))."""
        if self._start and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._scan -= self._start
            self._start = 0
