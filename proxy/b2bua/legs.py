"""Dialog state for one leg of a bridged call (RFC 3261 §12), and the call that pairs two.

A B2BUA is two user agents glued together: the *A leg* is the dialog in which the proxy
is the UAS (the request came to it), the *B leg* the dialog in which it is the UAC (it
sent the request on). Each leg has its own Call-ID, tags, CSeq space, route set and
remote target, so nothing of one dialog's identity leaks into the other.
"""

from __future__ import annotations

import itertools
import random
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from proxy.logsetup import call_fields
from proxy.media.engine import Side, StreamStats
from proxy.sip.headers import NameAddr
from proxy.sip.message import Response
from proxy.sip.transaction import Address, ClientTransaction, ServerTransaction

if TYPE_CHECKING:
    from proxy.b2bua.config import LineConfig
    from proxy.b2bua.media import MediaHandle
    from proxy.b2bua.routing import Failover
    from proxy.b2bua.sdes import SdesCall
    from proxy.b2bua.secure import CallSecurity


_unique = random.Random(secrets.randbits(128))


def new_tag() -> str:
    """Tags must be unique, not secret (RFC 3261 §19.3); Call-IDs stay cryptographic."""
    return f"{_unique.getrandbits(48):012x}"


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{host}"


PARTIES = {Side.INSIDE: "phone", Side.OUTSIDE: "far end"}
"""Who is at the other end of a leg on each side, in the end-of-call summary."""


@dataclass(slots=True)
class Leg:
    side: Side
    call_id: str
    local_tag: str
    local: NameAddr
    """Our end's address header (From on a UAC leg, To on a UAS leg), with our tag."""
    remote: NameAddr
    """The peer's address header (To on a UAC leg, From on a UAS leg)."""
    uac: bool
    local_cseq: int
    remote_tag: str | None = None
    remote_cseq: int | None = None
    remote_target: str | None = None
    route_set: list[str] = field(default_factory=list)
    flow: Address | None = None
    """Where the peer's messages come from: reused for requests to it (NAT, TCP)."""
    dest: Address | None = None
    """Where requests on this leg go (resolved once, refreshed on target refresh)."""
    supports_xsipura: bool = False
    invite_cseq: int = 0
    """CSeq number of the last INVITE sent on this leg (the ACK reuses it)."""
    ack_data: bytes | None = None
    """The ACK we sent for the last 2xx on this (UAC) leg: re-sent for 2xx retransmissions."""
    ack_cseq: int = 0
    """The CSeq number ``ack_data`` acknowledges (only that INVITE's 2xx is re-ACKed)."""
    early: dict[str, EarlyDialog] = field(default_factory=dict)
    """UAC leg before the answer: one early dialog per To tag (a forking proxy beyond
    us), so a 2xx from another branch is recognised as another dialog."""
    nat: bool = False
    """The peer's SDP address is not where its SIP comes from (NAT detected)."""

    def next_cseq(self) -> int:
        self.local_cseq += 1
        return self.local_cseq


MAX_EARLY_DIALOGS = 16
"""Early dialogs remembered per leg (To tags of provisional responses); more are not
tracked (their 2xx is still ACKed and BYEd as a dialog the call does not keep)."""


@dataclass(slots=True)
class EarlyDialog:
    """What a provisional response with a To tag established (RFC 3261 §12.1.2)."""

    remote: NameAddr
    remote_target: str | None
    route_set: list[str]


@dataclass(eq=False, slots=True)
class Branch:
    """One INVITE the call sent on toward the callee: the only one, or one fork of an
    inbound call to a line with several registered devices (RFC 3261 §16.7 style)."""

    leg: Leg
    invite_client: ClientTransaction | None = None
    got_provisional: bool = False
    cancel_sent: bool = False
    final: Response | None = None
    """The branch's final non-2xx response (kept for choosing the best one)."""

    @property
    def pending(self) -> bool:
        return self.final is None


class CallState(Enum):
    INVITING = "inviting"
    EARLY = "early"
    ANSWERED = "answered"
    """B answered and the 2xx went to A; waiting for A's ACK."""
    CONFIRMED = "confirmed"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


_call_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class RelayedRequest:
    """Client-transaction context: a request relayed from one leg to the other (or one
    the proxy sends in the dialog for the call itself: BYE, CANCEL), awaiting the far
    side's answer."""

    call: Call
    origin: Leg
    server_tx: ServerTransaction | None
    """None for requests the proxy originates itself (BYE on timeout, CANCEL...)."""
    answered: bool = False
    """INVITE only: a 2xx arrived; any further 2xx is a retransmission (RFC 6026)."""
    branch: Branch | None = None
    """The call's initial INVITE: which branch it went out on."""
    cancel_wanted: bool = False
    """A re-INVITE the origin cancelled before the far side's provisional answer: the
    CANCEL goes out when that arrives (RFC 3261 §9.1)."""
    client_tx: ClientTransaction | None = None
    """The relayed request's own client transaction (a re-INVITE's, for its CANCEL)."""
    got_provisional: bool = False
    """A re-INVITE: the far side answered provisionally (a CANCEL may follow)."""


@dataclass(eq=False, slots=True)
class OwnRequest:
    """Client-transaction context: a request the proxy originates in a call's dialog for
    itself, whose answer stays in the proxy: an x-sipura INFO on the outside leg, or the
    caller-ID refresh toward the phone."""

    call: Call
    leg: Leg
    purpose: str


@dataclass(eq=False, slots=True)
class Call:
    a: Leg
    b: Leg
    line: LineConfig | None
    invite_server: ServerTransaction
    state: CallState = CallState.INVITING
    media: MediaHandle | None = None
    cancelled: bool = False
    cancel_reason: str | None = None
    """The ``Reason`` (RFC 3326) of the CANCELs toward the callee when the proxy itself
    ended the ringing call (a drain's end, a policy): a late CANCEL carries it too."""
    branches: list[Branch] = field(default_factory=list)
    """Every INVITE sent toward the callee (one, or a fork per registered device); the
    one that answered becomes :attr:`b`."""
    ending_dialogs: list[Leg] = field(default_factory=list)
    """Dialogs the call does not keep (a fork's late 2xx, a second 2xx with another To
    tag): ACKed and BYEd, findable until their BYE is answered."""
    created: float = 0.0
    security: CallSecurity | None = None
    """x-sipura on the outside leg (None: a plain call)."""
    media_seen_at: float = 0.0
    """When the call's media counters last moved (``[media] rtp_timeout_s``)."""
    media_packets: int = -1
    secure_ssrc: int = 0
    """The SSRC the proxy announces and encrypts with toward the outside."""
    replaces: Call | None = None
    """The call this one replaces (an INVITE with ``Replaces``): it ends once this one
    is answered."""
    session_interval: float = 0.0
    """RFC 4028: the negotiated session interval (0: no session timer)."""
    fax_clear: bool = False
    """A T.38 stream on a secured call relayed unprotected (``[xsipura] t38 = "clear"``)."""
    answered_at: float | None = None
    """When the callee's 2xx arrived (talk time starts)."""
    ended_by: str | None = None
    """Who ended the call, for the end-of-call summary: ``phone``, ``far end`` or
    ``proxy`` (the first to act wins: a BYE crossing ours does not rewrite it)."""
    end_reason: str = ""
    """How or why: ``BYE``, ``CANCEL``, ``486 Busy Here``, ``RTP timeout``..."""
    media_final: dict[Side, list[StreamStats]] | None = None
    """The media counters of the released session, final (the summary's packets)."""
    ended_at: float | None = None
    """When the call left the table (its summary may wait for final media counters)."""
    log_fields: dict[str, object] = field(default_factory=dict, repr=False)
    """``call``/``call_id``/``line`` for log lines about this call (:mod:`proxy.logsetup`),
    built once by :meth:`fields`."""
    failover: Failover | None = None
    """Where the initial INVITE may go next if its target fails (RFC 3263 §4.3)."""
    sdes: SdesCall | None = None
    """SDES-SRTP on the outside leg (None: not considered for this call)."""
    id: int = field(default_factory=lambda: next(_call_ids))

    def other(self, leg: Leg) -> Leg:
        return self.b if leg is self.a else self.a

    def all_legs(self) -> list[Leg]:
        """Every leg the call's table entries point at: both legs, every fork, every
        dialog being ended."""
        legs = [self.a, self.b]
        legs += [branch.leg for branch in self.branches if branch.leg is not self.b]
        return legs + self.ending_dialogs

    def branch_of(self, leg: Leg) -> Branch | None:
        for branch in self.branches:
            if branch.leg is leg:
                return branch
        return None

    @property
    def winner(self) -> Branch | None:
        """The branch of :attr:`b` (the one that answered, or the only one)."""
        return self.branch_of(self.b)

    @property
    def forked(self) -> bool:
        return len(self.branches) > 1

    def end(self, who: str, why: str) -> None:
        """Note who ended the call and why, unless someone already did."""
        if self.ended_by is None:
            self.ended_by = who
            self.end_reason = why

    def fields(self) -> dict[str, object]:
        """The log fields of this call: its number, each leg's Call-ID by side, its
        line (built on first use; both Call-IDs are known once the call exists)."""
        if not self.log_fields:
            self.log_fields = call_fields(
                self.id,
                {self.a.side.value: self.a.call_id, self.b.side.value: self.b.call_id},
                self.line.user_id if self.line is not None else None,
            )
        return self.log_fields

    def leg_on(self, side: Side) -> Leg:
        return self.a if self.a.side is side else self.b

    @property
    def label(self) -> str:
        """How log lines name the call: its number and the A leg's Call-ID."""
        return f"{self.id} ({self.a.call_id})"

    @property
    def ringing(self) -> bool:
        """No final answer yet: a CANCEL (or the caller's BYE) still ends it."""
        return self.state in (CallState.INVITING, CallState.EARLY)

    @property
    def answered(self) -> bool:
        return self.state in (CallState.ANSWERED, CallState.CONFIRMED)

    @property
    def direction(self) -> str:
        return f"{self.a.side.value}->{self.b.side.value}"
