"""RTP port allocation: even RTP ports, RTP + 1 for RTCP (RFC 3550 §11).

The pool is a FIFO of free even ports: allocation takes the port that has been free the
longest and release appends at the back. Besides being O(1) both ways, that keeps a
just-released port out of circulation for as long as possible, so late packets of a
finished call (a peer that has not seen the BYE yet) do not land in the next call that
gets the same port.

The allocator knows nothing about sockets. A port may be taken by another process; the
caller then simply allocates again, and releases the ports that failed once it is done
(they go to the back of the queue and may well be free by the time they come round).
"""

from __future__ import annotations

from collections import deque

__all__ = ["PortAllocator", "PortsExhausted"]


class PortsExhausted(RuntimeError):
    """No free RTP/RTCP port pair left in the configured range."""


class PortAllocator:
    """Even RTP ports in ``[port_min, port_max]`` whose RTCP port (+1) is in range too."""

    __slots__ = ("_free", "_in_use", "port_max", "port_min")

    def __init__(self, port_min: int, port_max: int) -> None:
        if not 1 <= port_min <= port_max <= 65535:
            raise ValueError(f"bad port range {port_min}-{port_max}")
        first = port_min + (port_min & 1)  # round up to even
        if first + 1 > port_max:
            raise ValueError(f"port range {port_min}-{port_max} holds no RTP/RTCP pair")
        self.port_min = port_min
        self.port_max = port_max
        self._free: deque[int] = deque(range(first, port_max, 2))
        self._in_use: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"PortAllocator({self.port_min}-{self.port_max}, {self.available}/{self.capacity} free)"
        )

    @property
    def capacity(self) -> int:
        """Number of RTP/RTCP pairs in the range."""
        return len(self._free) + len(self._in_use)

    @property
    def available(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """An even RTP port (its RTCP port is the next one). Raises :class:`PortsExhausted`."""
        try:
            port = self._free.popleft()
        except IndexError:
            raise PortsExhausted(
                f"all {self.capacity} port pairs in {self.port_min}-{self.port_max} in use"
            ) from None
        self._in_use.add(port)
        return port

    def release(self, port: int) -> None:
        """Give a pair back. Releasing a port that is not allocated is a no-op, so every
        cleanup path can release without tracking who released first."""
        if port in self._in_use:
            self._in_use.remove(port)
            self._free.append(port)
