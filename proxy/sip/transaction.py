"""RFC 3261 §17 transactions (with RFC 6026's Accepted states), sans-IO.

One :class:`TransactionLayer` per SIP side of the B2BUA. It is fed parsed messages with
where they came from and the current time, and returns :class:`Transmit` actions (bytes
and a destination) plus events for the transaction user (the B2BUA core). It owns every
retransmission and every timer A-K, so nothing above it ever thinks about UDP loss.

Time is a float (seconds, monotonic) passed in by the caller; :meth:`next_deadline`
says when :meth:`poll` must next be called.

Two pragmatic choices, both what production B2BUAs do:

* INVITE server transactions answer ``100 Trying`` at once: the B2BUA always needs a
  round trip to the far side before it has a real answer.
* A 2xx to an INVITE is retransmitted by the server transaction (RFC 6026 "Accepted",
  timers G/L reused) until the ACK arrives; the ACK is matched by Call-ID, CSeq number
  and From tag because it carries a new branch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from proxy.ratelimit import LogLimiter
from proxy.sip.headers import MAGIC_COOKIE, Via, bare_host
from proxy.sip.message import Request, Response, SipMessage, SipParseError
from proxy.sip.retention import (
    SERVER_KEEPS,
    TX_OVERHEAD,
    RetainedBytes,
    slim_request,
    text_size,
)

log = logging.getLogger("sipura.transaction")

UNANSWERED_BACKSTOP = 10
"""A non-INVITE request unanswered for this many timer F periods gets a 500."""


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 Table 4 base values (seconds); all timers derive from these."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """64*T1: timers B, F, H, J, L."""
        return 64 * self.t1


@dataclass(frozen=True, slots=True)
class Address:
    """Where a message came from or goes to. ``conn`` identifies a TCP (or TLS)
    connection; ``name``, for TLS, is the host name the server's certificate must match
    (the URI's host, RFC 5922 §4: not an SRV target; None: ``host`` itself)."""

    host: str
    port: int
    transport: str = "udp"
    conn: int | None = None
    name: str | None = None

    @property
    def reliable(self) -> bool:
        return self.transport.lower() != "udp"


@dataclass(frozen=True, slots=True)
class Transmit:
    data: bytes
    dest: Address


# --- events for the transaction user ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new request; answer it with :meth:`TransactionLayer.respond` on ``tx``."""

    tx: ServerTransaction
    request: Request


@dataclass(frozen=True, slots=True)
class AckReceived:
    """An ACK for a 2xx (its own transaction per RFC 3261): the dialog layer's business."""

    request: Request
    source: Address


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    tx: ClientTransaction
    response: Response


@dataclass(frozen=True, slots=True)
class StrayResponse:
    """A response matching no transaction (e.g. a 2xx retransmitted after ours ended)."""

    response: Response
    source: Address


@dataclass(frozen=True, slots=True)
class TransactionTimeout:
    """Timer B or F fired (client), or H (server: no ACK for our error response) / L."""

    tx: ClientTransaction | ServerTransaction


TransactionEvent = (
    RequestReceived | AckReceived | ResponseReceived | StrayResponse | TransactionTimeout
)


class State(Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


_unique = random.Random(secrets.randbits(128))
"""Branches only need to be unique (RFC 3261 §8.1.1.7); a kernel call per branch
(``secrets``) cost ~4 % of the CPU of a call at 800 calls/s."""


def new_branch() -> str:
    return MAGIC_COOKIE + f"{_unique.getrandbits(64):016x}"


_ids = itertools.count(1)


class _Timed:
    """Deadlines that announce themselves: setting one pushes it on the layer's heap.

    A layer holds thousands of transactions (most just waiting out timers J/K/I/D), so
    finding the next deadline must not scan them all: every assignment of a deadline
    pushes ``(when, id, tx)`` on a heap shared with the layer, which skips entries that
    no longer match when it pops them (lazy deletion).
    """

    __slots__ = ()
    _heap: list[tuple[float, int, _Timed]] | None
    _retransmit: float | None
    _timeout: float | None
    id: int

    @property
    def retransmit_at(self) -> float | None:
        return self._retransmit

    @retransmit_at.setter
    def retransmit_at(self, when: float | None) -> None:
        self._retransmit = when  # type: ignore[misc]  # the slot lives in the dataclass
        self._announce(when)

    @property
    def timeout_at(self) -> float | None:
        return self._timeout

    @timeout_at.setter
    def timeout_at(self, when: float | None) -> None:
        self._timeout = when  # type: ignore[misc]  # the slot lives in the dataclass
        self._announce(when)

    def _announce(self, when: float | None) -> None:
        if when is not None and self._heap is not None:
            heapq.heappush(self._heap, (when, self.id, self))


@dataclass(eq=False, slots=True)
class ClientTransaction(_Timed):
    request: Request
    """The whole request: the transaction user may send it again to another target
    (RFC 3263 failover after a 503, a timeout or a transport failure). Charged in full
    against the budget."""
    dest: Address
    key: tuple[str, str]
    invite: bool
    state: State
    data: bytes
    """The bytes to retransmit (the request, then the ACK of an error response); empty
    once nothing will be retransmitted (a reliable transport, a final response)."""
    interval: float
    context: object = None
    """Opaque to the layer: the transaction user's bookkeeping (which call, which leg)."""
    last_status: int = 0
    cancel_sent: bool = False
    """INVITE only: a CANCEL went out, so timer B guards the wait for the final (§9.1)."""
    kept: int = 0
    """Characters of ``request`` (what it is charged for it)."""
    cost: int = 0
    """What it is charged against the layer's :class:`RetainedBytes` right now."""
    id: int = field(default_factory=lambda: next(_ids))
    _heap: list[tuple[float, int, _Timed]] | None = field(default=None, repr=False)
    _retransmit: float | None = None
    _timeout: float | None = None


@dataclass(eq=False, slots=True)
class ServerTransaction(_Timed):
    request: Request
    """The request's headers a response copies, no body (:data:`SERVER_KEEPS`): read
    anything else from the request :class:`RequestReceived` carried."""
    source: Address
    key: tuple[str, str, str]
    invite: bool
    state: State
    last_response: bytes | None = None
    last_status: int = 0
    interval: float = 0.0
    context: object = None
    kept: int = 0
    cost: int = 0
    had_body: bool = False
    """The request carried a body (an INVITE's offer): its answer is not an offer."""
    id: int = field(default_factory=lambda: next(_ids))
    _heap: list[tuple[float, int, _Timed]] | None = field(default=None, repr=False)
    _retransmit: float | None = None
    _timeout: float | None = None


def _server_key(request: Request) -> tuple[str, str, str]:
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        host, port = via.sent_by
        return branch, f"{host}:{port}", method
    # RFC 2543 peers: no magic cookie. Approximate §17.2.3's rule with the dialog fields.
    from_tag = request.from_.tag or ""
    return f"2543:{request.call_id}:{request.cseq.number}:{from_tag}", str(via), method


def _client_key(message: SipMessage, method: str) -> tuple[str, str]:
    return message.top_via.branch or "", method


_OWN_VIA = re.compile(r"SIP/2\.0/[A-Z]+ [A-Za-z0-9.:\[\]-]+;branch=(z9hG4bK[0-9a-f]+);rport")
"""The Via the proxy writes on every request it sends (``SipSides.via``)."""


def _sent_key(request: Request, method: str) -> tuple[str, str]:
    """:func:`_client_key` of a request the proxy is about to send. Its top Via is the
    proxy's own, freshly branched, so a full parse (~11 µs, once per request sent) is
    never served from the parse cache; the branch is read off the text when the text
    has exactly the proxy's form, and parsed as any other Via otherwise."""
    for hname, value in request.headers:
        if hname == "Via":
            own = _OWN_VIA.fullmatch(value)
            if own is not None:
                return own.group(1), method
            break
        if hname.lower() in ("via", "v"):
            break
    return _client_key(request, method)


def build_ack_for_error(request: Request, response: Response) -> Request:
    """§17.1.1.3: the ACK for a non-2xx is part of the INVITE client transaction."""
    ack = Request(method="ACK", uri=request.uri)
    ack.add("Via", str(request.top_via))
    for route in request.get_all("route"):
        ack.add("Route", route)
    ack.add("Max-Forwards", "70")
    ack.add("From", request.get("from") or "")
    ack.add("To", response.get("to") or request.get("to") or "")
    ack.add("Call-ID", request.call_id)
    ack.add("CSeq", f"{request.cseq.number} ACK")
    return ack


def response_to(
    request: Request, status: int, reason: str, *, to_tag: str | None = None
) -> Response:
    """A response that copies Via, From, To (+tag), Call-ID and CSeq (§8.2.6.2)."""
    response = Response(status=status, reason=reason)
    for hname, value in request.headers:
        key = hname.lower()
        if key in ("via", "v", "from", "f", "call-id", "i", "cseq", "record-route"):
            response.add(hname, value)
        elif key in ("to", "t"):
            if to_tag and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            response.add(hname, value)
    return response


class TransactionLayer:
    """All transactions of one SIP side."""

    def __init__(self, timers: Timers | None = None, budget: RetainedBytes | None = None) -> None:
        self.timers = timers or Timers()
        self.budget = budget or RetainedBytes()
        self.retained = 0
        """What this layer's transactions are charged (its share of ``budget``)."""
        self._clients: dict[tuple[str, str], ClientTransaction] = {}
        self._servers: dict[tuple[str, str, str], ServerTransaction] = {}
        self._accepted: dict[tuple[str, int, str], ServerTransaction] = {}
        self._completed: OrderedDict[tuple[str, str, str], ServerTransaction] = OrderedDict()
        """Answered non-INVITE server transactions, oldest first (what :meth:`_shed` may
        end early)."""
        self._heap: list[tuple[float, int, _Timed]] = []
        self._notes = LogLimiter(log)
        self.shed = 0
        """Transactions ended early to admit new requests (:meth:`_shed`)."""

    def __len__(self) -> int:
        return len(self._clients) + len(self._servers)

    def snapshot(self) -> dict[str, int]:
        """For ``/status``: transactions alive, bytes they hold, requests refused."""
        return {
            "server": len(self._servers),
            "client": len(self._clients),
            "retained_bytes": self.retained,
            "budget_used_bytes": self.budget.used,
            "budget_bytes": self.budget.limit,
            "shed": self.shed,
            "refused": self.budget.refused,
        }

    # --- memory accounting ------------------------------------------------------------

    def _charge(self, tx: ClientTransaction | ServerTransaction) -> None:
        """Re-charge ``tx`` after what it holds changed."""
        held = tx.data if isinstance(tx, ClientTransaction) else tx.last_response
        cost = TX_OVERHEAD + tx.kept + len(held or b"")
        self.budget.used += cost - tx.cost
        self.retained += cost - tx.cost
        tx.cost = cost

    def _release(self, tx: ClientTransaction | ServerTransaction) -> None:
        self.budget.used -= tx.cost
        self.retained -= tx.cost
        tx.cost = 0

    def _end_server(self, stx: ServerTransaction) -> None:
        stx.state = State.TERMINATED
        stx.retransmit_at = None
        del self._servers[stx.key]
        self._completed.pop(stx.key, None)
        self._release(stx)
        # Timer entries set earlier (the backstop's, 320 s out) stay on the heap until
        # their time: they must not keep the texts of an ended transaction alive.
        stx.request = slim_request(stx.request, frozenset())
        stx.last_response = None

    def _shed(self, method: str) -> bool:
        """Make room by ending the oldest answered non-INVITE server transactions early.

        They only absorb retransmissions of requests already answered (timer J, 32 s
        over UDP), so under a flood their state is the cheapest to give up: the cost is
        that such a retransmission, if one still comes, is processed again. Returns
        whether the budget admits ``method`` now."""
        while self._completed and not self.budget.admits(method):
            _, oldest = self._completed.popitem(last=False)
            if self._servers.get(oldest.key) is oldest:
                self._end_server(oldest)
                self.shed += 1
        self._compact_heap()
        return self.budget.admits(method)

    def _compact_heap(self) -> None:
        """Drop stale timer entries once they outnumber the live ones: with lazy
        deletion, every transaction ended before its deadline (shed, answered early)
        leaves entries behind until their time, and a flood must not grow the heap."""
        heap = self._heap
        if len(heap) <= 4 * len(self) + 4096:
            return
        heap[:] = [entry for entry in heap if self._due(entry[2], entry[0])]
        heapq.heapify(heap)

    def _backstop(self) -> float:
        """How long a non-INVITE request may wait for the transaction user's answer:
        timer F ten times over (320 s by default), room for a relay that fails over
        through several targets, each given its own timer F (RFC 3263)."""
        return UNANSWERED_BACKSTOP * self.timers.timeout

    def _unanswered(self, stx: ServerTransaction, now: float) -> list[Transmit]:
        """A backstop, not a protocol timer: the transaction user answers every request
        (a relayed one with the far side's answer or a 408 of its own at timer F), so a
        non-INVITE request still unanswered after :meth:`_backstop` is a bug upstream of
        here. It gets a 500, and the transaction ends like any answered one: no request
        is left without an answer and no state outlives its timers."""
        waited = self._backstop()
        self._notes.log(logging.WARNING, "unanswered", stx.source.host, now,
                        "%s from %s:%s unanswered for %.0f s: 500", stx.request.method,
                        stx.source.host, stx.source.port, waited)  # fmt: skip
        response = response_to(stx.request, 500, "Server Internal Error",
                               to_tag=f"{_unique.getrandbits(48):012x}")  # fmt: skip
        return self.respond(stx, response, now)

    def _overloaded(self, request: Request, source: Address, now: float) -> list[Transmit]:
        """A stateless 503: the transactions already hold the whole budget."""
        self.budget.refused += 1
        self._notes.log(logging.WARNING, "transaction_budget", source.host, now,
                        "transactions hold %d bytes (budget %d): 503 to %s from %s:%s",
                        self.budget.used, self.budget.limit, request.method, source.host,
                        source.port)  # fmt: skip
        response = response_to(request, 503, "Service Unavailable",
                                to_tag=f"{_unique.getrandbits(48):012x}")  # fmt: skip
        response.add("Retry-After", "5")
        return [Transmit(response.serialize(), source)]

    # --- client side ------------------------------------------------------------------

    def send_request(
        self, request: Request, dest: Address, now: float, context: object = None
    ) -> tuple[ClientTransaction, list[Transmit]]:
        """Start a client transaction. The request's top Via must carry a fresh branch.

        ACK for a 2xx is not a transaction: use :meth:`send_stateless`. A CANCEL re-arms
        the INVITE's timer B: without a final response within 64*T1 the INVITE transaction
        times out (§9.1) instead of waiting for ever in "Proceeding".
        """
        if request.method == "ACK":
            raise ValueError("ACK for 2xx is sent with send_stateless")
        invite = request.method == "INVITE"
        data = request.serialize()
        t = self.timers
        if request.method == "CANCEL":
            target = self._clients.get(_client_key(request, "INVITE"))
            if target is not None and target.state in (State.CALLING, State.PROCEEDING):
                target.cancel_sent = True
                target.timeout_at = now + t.timeout
        tx = ClientTransaction(
            request=request,
            dest=dest,
            key=_sent_key(request, request.method),
            invite=invite,
            state=State.CALLING if invite else State.TRYING,
            data=b"" if dest.reliable else data,
            interval=t.t1,
            context=context,
            _heap=self._heap,
        )
        tx.retransmit_at = None if dest.reliable else now + t.t1
        tx.timeout_at = now + t.timeout
        tx.kept = text_size(request) + len(request.body)
        replaced = self._clients.get(tx.key)
        if replaced is not None:
            self._release(replaced)
        self._clients[tx.key] = tx
        self._charge(tx)
        return tx, [Transmit(data, dest)]

    def send_stateless(self, message: SipMessage, dest: Address) -> list[Transmit]:
        return [Transmit(message.serialize(), dest)]

    def _on_response(
        self, response: Response, source: Address, now: float
    ) -> tuple[list[TransactionEvent], list[Transmit]]:
        try:
            key = _client_key(response, response.cseq.method)
        except SipParseError:
            return [], []
        tx = self._clients.get(key)
        if tx is None or tx.state is State.TERMINATED:
            return [StrayResponse(response, source)], []
        status = response.status
        t = self.timers
        if tx.invite:
            if tx.state in (State.CALLING, State.PROCEEDING):
                tx.last_status = status
                if status < 200:
                    tx.state = State.PROCEEDING
                    tx.retransmit_at = None
                    if not tx.cancel_sent:
                        tx.timeout_at = None  # timer B runs only in "Calling" (§17.1.1.2)
                    return [ResponseReceived(tx, response)], []
                if status < 300:
                    # RFC 6026 Accepted: absorb nothing, pass every 2xx to the TU.
                    tx.state = State.ACCEPTED
                    tx.retransmit_at = None
                    tx.timeout_at = now + t.timeout
                    tx.data = b""
                    self._charge(tx)
                    return [ResponseReceived(tx, response)], []
                tx.state = State.COMPLETED
                tx.retransmit_at = None
                tx.timeout_at = now + (0 if tx.dest.reliable else 32.0)
                ack = build_ack_for_error(tx.request, response).serialize()
                tx.data = b"" if tx.dest.reliable else ack
                self._charge(tx)
                return [ResponseReceived(tx, response)], [Transmit(ack, tx.dest)]
            if tx.state is State.ACCEPTED and 200 <= status < 300:
                return [ResponseReceived(tx, response)], []
            if tx.state is State.COMPLETED and status >= 300:
                return [], [Transmit(tx.data, tx.dest)]  # re-ACK a retransmitted error
            return [], []
        # non-INVITE
        if tx.state in (State.TRYING, State.PROCEEDING):
            tx.last_status = status
            if status < 200:
                tx.state = State.PROCEEDING
                return [ResponseReceived(tx, response)], []
            tx.state = State.COMPLETED
            tx.retransmit_at = None
            tx.timeout_at = now + (0 if tx.dest.reliable else t.t4)
            tx.data = b""  # timer K only absorbs retransmitted responses
            self._charge(tx)
            return [ResponseReceived(tx, response)], []
        return [], []

    # --- server side ------------------------------------------------------------------

    def _on_request(
        self, request: Request, source: Address, now: float
    ) -> tuple[list[TransactionEvent], list[Transmit]]:
        key = _server_key(request)
        tx = self._servers.get(key)
        if request.method == "ACK":
            if tx is not None and tx.invite:
                if tx.state is State.COMPLETED:
                    tx.state = State.CONFIRMED
                    tx.retransmit_at = None
                    tx.timeout_at = now + (0 if source.reliable else self.timers.t4)
                    return [], []
                if tx.state is State.CONFIRMED:
                    return [], []
            accepted = self._accepted.pop(self._ack_key(request), None)
            if accepted is not None:
                accepted.state = State.TERMINATED
                accepted.retransmit_at = None
                accepted.timeout_at = now  # reaped at the next poll
            return [AckReceived(request, source)], []
        if tx is not None:  # a retransmission: repeat the last response, if any
            if tx.last_response is not None and tx.state is not State.TERMINATED:
                return [], [Transmit(tx.last_response, tx.source)]
            return [], []
        if not self.budget.admits(request.method) and not self._shed(request.method):
            return [], self._overloaded(request, source, now)
        invite = request.method == "INVITE"
        tx = ServerTransaction(
            request=slim_request(request, SERVER_KEEPS),
            had_body=bool(request.body),
            source=source,
            key=key,
            invite=invite,
            state=State.PROCEEDING if invite else State.TRYING,
            _heap=self._heap,
        )
        self._servers[key] = tx
        tx.kept = text_size(tx.request)
        out: list[Transmit] = []
        if invite:
            trying = response_to(request, 100, "Trying")
            tx.last_response = trying.serialize()
            tx.last_status = 100
            out.append(Transmit(tx.last_response, source))
        else:
            tx.timeout_at = now + self._backstop()  # see _unanswered
        self._charge(tx)
        return [RequestReceived(tx, request)], out

    @staticmethod
    def _ack_key(request: Request) -> tuple[str, int, str]:
        return request.call_id, request.cseq.number, request.from_.tag or ""

    def respond(self, tx: ServerTransaction, response: Response, now: float) -> list[Transmit]:
        """Send a response on a server transaction (the layer retransmits as needed)."""
        if tx.state in (State.COMPLETED, State.CONFIRMED, State.TERMINATED, State.ACCEPTED):
            return []  # already answered finally: a late TU response is dropped
        data = response.serialize()
        status = response.status
        tx.last_response = data
        tx.last_status = status
        self._charge(tx)
        t = self.timers
        reliable = tx.source.reliable
        if status < 200:
            if not tx.invite:
                tx.state = State.PROCEEDING
            return [Transmit(data, tx.source)]
        if tx.invite:
            if status < 300:
                tx.state = State.ACCEPTED
                self._accepted[self._ack_key(tx.request)] = tx
            else:
                tx.state = State.COMPLETED
            tx.interval = t.t1
            tx.retransmit_at = None if reliable else now + t.t1
            tx.timeout_at = now + t.timeout
        else:
            tx.state = State.COMPLETED
            tx.timeout_at = now + (0 if reliable else t.timeout)
            self._completed[tx.key] = tx
        return [Transmit(data, tx.source)]

    # --- input and timers ---------------------------------------------------------------

    def receive(
        self, message: Request | Response, source: Address, now: float
    ) -> tuple[list[TransactionEvent], list[Transmit]]:
        """Feed one parsed message. Requests get received/rport stamped (RFC 3581)."""
        if isinstance(message, Response):
            return self._on_response(message, source, now)
        stamp_via(message, source)
        return self._on_request(message, source, now)

    def fail_transport(self, dest: Address, now: float) -> list[TransactionEvent]:
        """No connection to ``dest`` could be made (RFC 3261 §8.1.3.1: a transport error
        counts as a timeout, so the user may fail over): every client transaction still
        waiting on it times out now. Rare, so a scan is fine."""
        events: list[TransactionEvent] = []
        where = (dest.host, dest.port, dest.transport)
        for key, tx in list(self._clients.items()):
            if (tx.dest.host, tx.dest.port, tx.dest.transport) != where:
                continue
            if tx.state in (State.CALLING, State.TRYING, State.PROCEEDING):
                events.append(TransactionTimeout(tx))
            tx.state = State.TERMINATED
            tx.retransmit_at = None
            del self._clients[key]
        return events

    def find_invite_server(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL targets (§9.2: same branch)."""
        key = _server_key(cancel)
        return self._servers.get((key[0], key[1], "INVITE"))

    def next_deadline(self) -> float | None:
        """The earliest pending timer (stale heap entries are dropped on the way)."""
        heap = self._heap
        while heap:
            when, _, tx = heap[0]
            if self._due(tx, when):
                return when
            heapq.heappop(heap)
        return None

    def _due(self, tx: _Timed, when: float) -> bool:
        """Whether a heap entry still stands for a live transaction's deadline."""
        if when != tx.retransmit_at and when != tx.timeout_at:
            return False
        if isinstance(tx, ClientTransaction):
            return self._clients.get(tx.key) is tx
        return isinstance(tx, ServerTransaction) and self._servers.get(tx.key) is tx

    def poll(self, now: float) -> tuple[list[TransactionEvent], list[Transmit]]:
        """Fire every timer due at ``now`` (only the transactions with one due)."""
        events: list[TransactionEvent] = []
        out: list[Transmit] = []
        self._notes.flush(now, logging.WARNING)
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, tx = heapq.heappop(heap)
            if not self._due(tx, when):
                continue
            if isinstance(tx, ClientTransaction):
                self._fire_client(tx, now, events, out)
            elif isinstance(tx, ServerTransaction):
                self._fire_server(tx, now, events, out)
        return events, out

    def _fire_client(
        self, ctx: ClientTransaction, now: float, events: list[TransactionEvent],
        out: list[Transmit],
    ) -> None:  # fmt: skip
        t = self.timers
        if ctx.timeout_at is not None and now >= ctx.timeout_at:
            if ctx.state in (State.CALLING, State.TRYING, State.PROCEEDING):
                events.append(TransactionTimeout(ctx))  # timers B / F
            ctx.state = State.TERMINATED
            ctx.retransmit_at = None
            del self._clients[ctx.key]
            self._release(ctx)
            return  # a timed-out request is not retransmitted one last time
        if ctx.retransmit_at is not None and now >= ctx.retransmit_at:
            out.append(Transmit(ctx.data, ctx.dest))  # timers A / E
            ctx.interval = ctx.interval * 2 if ctx.invite else min(ctx.interval * 2, t.t2)
            if not ctx.invite and ctx.state is State.PROCEEDING:
                ctx.interval = t.t2
            ctx.retransmit_at = now + ctx.interval

    def _fire_server(
        self, stx: ServerTransaction, now: float, events: list[TransactionEvent],
        out: list[Transmit],
    ) -> None:  # fmt: skip
        if stx.timeout_at is not None and now >= stx.timeout_at:
            if not stx.invite and stx.state in (State.TRYING, State.PROCEEDING):
                out.extend(self._unanswered(stx, now))
                return
            if stx.invite and stx.state in (State.COMPLETED, State.ACCEPTED):
                events.append(TransactionTimeout(stx))  # timer H / L: no ACK (J is not)
            if stx.state is State.ACCEPTED:
                self._accepted.pop(self._ack_key(stx.request), None)
            self._end_server(stx)
            return
        if stx.retransmit_at is not None and now >= stx.retransmit_at:
            if stx.last_response is not None:
                out.append(Transmit(stx.last_response, stx.source))  # timer G / 2xx
            stx.interval = min(stx.interval * 2, self.timers.t2)
            stx.retransmit_at = now + stx.interval


def stamp_via(request: Request, source: Address) -> None:
    """RFC 3261 §18.2.1 ``received`` and RFC 3581 ``rport`` on the top Via."""
    for index, (hname, value) in enumerate(request.headers):
        if hname.lower() not in ("via", "v"):
            continue
        first, sep, rest = value.partition(",")
        try:
            via = Via.parse(first)
        except ValueError:
            return
        changed = via
        same_host = bare_host(via.host).lower() == bare_host(source.host).lower()
        if via.param("rport") is not None or not same_host:
            changed = changed.with_param("received", source.host)
        if via.param("rport") is not None:
            changed = changed.with_param("rport", str(source.port))
        if changed is not via:
            request.headers[index] = (hname, str(changed) + (sep + rest if sep else ""))
        return
