"""SDES in the call: which calls get an :class:`~proxy.b2bua.sdes.SdesCall`, every SDP
crossing handed to it, its keys handed to the media, and what SDES means for the rest
of the call (x-sipura not needed, the secure-call tone, the method shown per call).

:mod:`proxy.b2bua.sdes` decides; this module only dispatches, as
:mod:`proxy.b2bua.secure_leg` does for x-sipura. The SDP paths of the core (call set-up,
in-dialog requests, responses, ACK) call :meth:`SdesLegs.crossing` with the body the
media anchor produced and whether it is an offer; a refusal becomes a 488 (an offer the
proxy cannot key) or a failed call (``sdes = "require"`` and an answer without keys).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from proxy.b2bua.config import Config
from proxy.b2bua.legs import Call
from proxy.b2bua.messages import Reject
from proxy.b2bua.sdes import Policy, SdesCall, SdesRefused, StreamKeys
from proxy.b2bua.secure import SecureState
from proxy.media.engine import Side
from proxy.sip.sdp import SdpError
from proxy.sip.transaction import Address

log = logging.getLogger("sipura.sdes")

CLEAR, SDES, XSIPURA = "clear", "sdes", "x-sipura"


def method_of(call: Call) -> str:
    """How the call's outside leg is secured now: ``x-sipura``, ``sdes`` or ``clear``."""
    if call.sdes is not None and call.sdes.active:
        return SDES
    if call.security is not None and call.security.state is SecureState.SECURE:
        return XSIPURA
    return CLEAR


class SdesLegs:
    def __init__(self, config: Config) -> None:
        self.config = config

    def for_new_call(self, call: Call, outside: Address) -> SdesCall:
        """Every call gets one; ``outside`` is where the outside leg's SIP goes (or came
        from): keys may only travel there over TLS, unless the operator allowed it."""
        side = self.config.outside
        transport_ok = outside.transport == "tls" or side.sdes_over_insecure_transport
        outbound = call.a.side is Side.INSIDE
        xsipura = call.security is not None and (outbound or call.a.supports_xsipura)
        policy = Policy(side.sdes, transport_ok, xsipura_possible=xsipura and not outbound)
        return SdesCall(policy, call.label, outbound)

    def crossing(
        self, call: Call, from_side: Side, body: bytes, *, offer: bool, final: bool = True
    ) -> bytes:
        """An SDP body (already anchored) on its way from ``from_side`` to the other side.
        Raises :class:`Reject` 488 for an offer SDES cannot take and
        :class:`SdesRefused` for a final answer ``require`` cannot accept."""
        sdes = call.sdes
        if sdes is None:
            return body
        if sdes.outbound and not offer and from_side is Side.OUTSIDE:
            possible = call.security is not None and call.b.supports_xsipura
            sdes.policy = replace(sdes.policy, xsipura_possible=possible)
        try:
            if from_side is Side.INSIDE:
                rewritten, keys = sdes.toward_outside(body, offer)
            else:
                rewritten, keys = sdes.toward_inside(body, offer, final=final)
        except SdpError as exc:
            log.info("call %d: SDP SDES cannot read, passed as is: %s", call.id, exc)
            return body
        except SdesRefused as exc:
            if offer:
                warning = [("Warning", f'399 - "SRTP: {exc}"')]
                raise Reject(488, "Not Acceptable Here", warning) from exc
            raise
        if keys:
            self._keys(call, keys)
        if call.media is not None:
            call.media.last_sent[from_side.other] = rewritten
        return rewritten

    def retarget(self, call: Call, target: Address, body: bytes) -> bytes:
        """The initial offer goes to another target (failover): keys only over TLS."""
        sdes = call.sdes
        if sdes is None or not sdes.offered or not body:
            return body
        if target.transport == "tls" or self.config.outside.sdes_over_insecure_transport:
            return body
        log.info("call %d: failover onto %s: SDES keys withdrawn", call.id, target.transport)
        try:
            return sdes.withdraw(body)
        except SdpError:
            return body

    def _keys(self, call: Call, keys: list[StreamKeys]) -> None:
        """SRTP on the outside leg from the first packet, both ways; x-sipura is not
        needed on top (it would re-key what SDES keyed)."""
        if call.security is not None and call.security.state is not SecureState.SECURE:
            log.info("call %d: SDES secures the call; no x-sipura", call.id)
            call.security = None
        if call.media is not None:
            apply_keys(call, keys)


def apply_keys(call: Call, keys: list[StreamKeys]) -> None:
    """Hand SDES keys to the media engine (send and receive keys differ in SDES)."""
    assert call.media is not None
    try:
        call.media.set_sdes_keys(keys)
    except (ValueError, IndexError) as exc:  # a stream beyond the anchored ones
        log.warning("call %d: SDES keys not applied: %s", call.id, exc)
