"""Fax on a secured call: what a T.38 re-offer may do (``[xsipura] t38``).

An ATA that detects a fax tone re-INVITEs to T.38: ``m=audio 0`` plus
``m=image PORT udptl t38``. UDPTL is not RTP, and x-sipura protects RTP only (profile
§3), so on a secured call T.38 would carry the fax in the clear. ``[xsipura] t38``
chooses (decision 49):

* ``"refuse"`` (default): the re-offer gets 488 Not Acceptable Here; the ATA keeps
  faxing over G.711 pass-through, which stays inside SRTP;
* ``"clear"``: the re-offer is relayed, UDPTL goes through unprotected, the call is
  counted and shown as ``fax_clear`` (``calls``, ``/status``).

Either way one log line says which happened. A call that is not secured relays T.38
like any other stream (every m-line anchored, the UDPTL stream marked non-RTP so the
relay never SRTP-processes, renumbers or mixes a tone into it).
"""

from __future__ import annotations

import logging

from proxy.b2bua.config import XsipuraConfig
from proxy.b2bua.legs import Call
from proxy.b2bua.messages import Reject
from proxy.b2bua.secure import SecureState
from proxy.b2bua.stats import Stats
from proxy.ratelimit import LogLimiter
from proxy.sip.sdp import SdpError, parse_sdp

log = logging.getLogger("sipura.b2bua")

NOT_RTP = "udptl"
"""The transport protocol of T.38 over UDP (RFC 3362); other non-RTP protocols are
recognised by the absence of ``RTP`` in theirs (:func:`stream_kind`)."""


def stream_kind(protocol: str) -> str:
    """``rtp`` for RTP/AVP, RTP/SAVP, UDP/TLS/RTP/SAVPF...; ``udptl`` for T.38; else
    ``udp`` (some other datagram protocol, relayed byte for byte)."""
    upper = protocol.upper()
    if "RTP" in upper.split("/"):
        return "rtp"
    return NOT_RTP if upper == "UDPTL" else "udp"


def t38_offer(content_type: str, body: bytes) -> bool:
    """The body offers a live (port != 0) UDPTL stream."""
    if not body or content_type != "application/sdp":
        return False
    try:
        sdp = parse_sdp(body)
    except SdpError:
        return False
    return any(m.port and stream_kind(m.protocol) == NOT_RTP for m in sdp.media)


class FaxPolicy:
    def __init__(self, settings: XsipuraConfig, stats: Stats, noise: LogLimiter) -> None:
        self.settings = settings
        self.stats = stats
        self._log = noise

    def on_offer(
        self, call: Call, content_type: str, body: bytes, from_side: str, now: float
    ) -> None:
        """A re-offer in ``call``: raises 488 when it is T.38 on a secured call and the
        policy refuses it; marks the call ``fax_clear`` when the policy lets it through."""
        security = call.security
        if security is None or security.state not in (SecureState.SECURE, SecureState.HANDSHAKING):
            return
        if not t38_offer(content_type, body):
            return
        if self.settings.t38 == "refuse":
            self.stats.fax_refused += 1
            self._log.log(logging.WARNING, "t38_refused", str(call.id), now,
                          "call %d: T.38 re-offer from the %s side refused (488) on a secured "
                          "call: the fax stays on G.711 inside SRTP (xsipura.t38 = refuse)",
                          call.id, from_side)  # fmt: skip
            raise Reject(488, "Not Acceptable Here",
                         [("Warning", '399 - "T.38 refused on a secured call"')])  # fmt: skip
        if not call.fax_clear:
            call.fax_clear = True
            self.stats.fax_clear += 1
            log.warning("call %d: T.38 fax from the %s side relayed IN THE CLEAR on a secured "
                        "call (xsipura.t38 = clear)", call.id, from_side)  # fmt: skip
