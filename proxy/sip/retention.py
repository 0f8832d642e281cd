"""What a transaction keeps of its messages, and the byte budget all of them share.

A transaction may live 32 s (timers J, L, F over UDP), so everything it holds is held
that long for every request of a flood: a 64 KB request kept whole cost 680 MB at 300
requests/s. So a server transaction keeps only what a retransmission or a response
needs (:func:`slim_request`); a client transaction keeps its request whole (a failover
re-sends it), but only the proxy's own requests and relayed ones, which each needed an
admitted server transaction first. Every transaction is charged against one
:class:`RetainedBytes` budget (docs/decisions.md §56).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.sip.message import Request, canonical

__all__ = [
    "DEFAULT_BUDGET",
    "SERVER_KEEPS",
    "TX_OVERHEAD",
    "RetainedBytes",
    "slim_request",
    "text_size",
]

TX_OVERHEAD = 2560
"""Bytes a transaction costs beyond the texts it keeps (its object, keys, dict slots and
timer entries, the parsed header list): tracemalloc measured ~3.3 KB in all for an
answered OPTIONS whose kept texts and response come to ~0.8 KB."""
DEFAULT_BUDGET = 48 * 1024 * 1024
"""What the transactions of both sides may hold together (:class:`RetainedBytes`):
with the process's ~45 MB at idle and the bounded caches, the SIP process stays under
200 MB in any flood."""
END_REQUESTS_HEADROOM = 1.25
"""CANCEL and BYE free state, so they are admitted up to this multiple of the budget."""


@dataclass(slots=True)
class RetainedBytes:
    """The bytes transactions hold, against a limit; may be shared by several layers.

    Every transaction is charged :data:`TX_OVERHEAD` plus the texts it keeps (its slim
    request, its last response or the request it retransmits). A request arriving while
    the budget is spent first makes room by ending the oldest answered non-INVITE
    transactions early (``TransactionLayer._shed``); when nothing can be ended it
    gets a stateless ``503`` with ``Retry-After`` instead of a transaction. Either way
    memory stays bounded under a flood, and legitimate peers are still answered."""

    limit: int = DEFAULT_BUDGET
    used: int = 0
    refused: int = 0

    def admits(self, method: str) -> bool:
        limit = self.limit * END_REQUESTS_HEADROOM if method in ("CANCEL", "BYE") else self.limit
        return self.used < limit


SERVER_KEEPS = frozenset({"via", "from", "to", "call-id", "cseq", "record-route"})
"""What a server transaction keeps of its request: what a response copies (§8.2.6.2)
and the ACK of a 2xx is matched by. The transaction user gets the whole request once,
in :class:`RequestReceived`; for the 32 s a transaction may live, the body and every
other header are garbage (a 64 KB request kept whole cost 680 MB at 300 requests/s)."""


def slim_request(request: Request, keep: frozenset[str]) -> Request:
    """A copy of ``request`` with only the ``keep`` headers (canonical names), no body."""
    headers = [(name, value) for name, value in request.headers if canonical(name) in keep]
    return Request(headers=headers, method=request.method, uri=request.uri,
                   version=request.version)  # fmt: skip


def text_size(request: Request) -> int:
    return len(request.uri) + sum(len(name) + len(value) for name, value in request.headers)
