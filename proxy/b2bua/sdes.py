"""SDES-SRTP (RFC 4568) on the outside leg: the per-call policy, sans-IO.

x-sipura (:mod:`proxy.b2bua.secure`) secures calls toward SPA devices; most other far
ends (Asterisk, FreeSWITCH, ITSPs) key SRTP with ``a=crypto`` lines in the SDP over
SIP/TLS instead. The phone never sees any of it: every SDP that crosses the proxy goes
through :meth:`SdesCall.toward_outside` or :meth:`SdesCall.toward_inside` after the
media anchor has rewritten it, with ``offer`` saying whether it is an offer or the
answer to one. Toward the phone every ``a=crypto`` line is removed and ``RTP/SAVP``
becomes ``RTP/AVP``; toward the outside the proxy's own keys are added.

* Outbound (the phone calls): mode ``offer`` keeps ``RTP/AVP`` and adds one ``a=crypto``
  per suite (best-effort SRTP, beside ``Supported: x-sipura``); ``require`` offers
  ``RTP/SAVP``. An answer with a usable ``a=crypto`` makes the leg SRTP from the first
  packet; none leaves x-sipura to try (``offer``) or refuses the call (``require``,
  unless x-sipura can secure it: :attr:`SdesCall.refused`).
* Inbound (a call to a line): an offer with usable ``a=crypto`` (``RTP/SAVP`` or
  ``RTP/AVP``) is answered with a fresh key of the proxy's; ``RTP/SAVP`` the proxy
  cannot take (SDES off, keys over plain transport, no usable suite) is refused (488).
  A best-effort (``RTP/AVP``) offer from a peer that also advertises x-sipura, to a line
  with a Mini Certificate, is answered without crypto: x-sipura follows and proves who
  is called (the SPA's ``$``), which SDES cannot.
* Re-offers (RFC 4568 §6.8, §7.1.4): a stream whose peer key is unchanged keeps the
  proxy's key too; a new peer key (or a new offer by the proxy after a refusal) gets a
  new one, so a key is never reused with a fresh SRTP state.

Every result for the media is a :class:`StreamKeys` value (the key the proxy sends with,
the key the peer sends with); keys never appear in a repr or a log line.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from proxy.sip.sdp import Sdp, parse_sdp
from proxy.sip.sdp_crypto import (
    KEY_LENGTH,
    SALT_LENGTH,
    SUITES,
    Crypto,
    CryptoEdit,
    crypto_of,
    is_savp,
    plain_protocol,
    rewrite_crypto,
    secure_protocol,
    strip_all,
)

log = logging.getLogger("sipura.sdes")

SECURABLE = frozenset({"RTP/AVP", "RTP/SAVP", "RTP/AVPF", "RTP/SAVPF"})
"""Media protocols SDES can protect (RTP over UDP)."""


class SdesState(Enum):
    NONE = "none"
    """Nothing offered or accepted yet."""
    OFFERED = "offered"
    """The proxy offered keys to the peer; no answer yet."""
    ACTIVE = "active"
    """Keys agreed both ways: the outside leg is SRTP."""
    DECLINED = "declined"
    """No SDES on this call (the peer did not take it, or the proxy did not)."""


class SdesRefused(Exception):
    """An SDP SDES cannot accept: an ``RTP/SAVP`` offer the proxy cannot key (488), or,
    with ``sdes = "require"``, an answer without keys."""


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """SRTP for stream ``index`` of the outside leg: packets toward the peer are protected
    with ``send``, packets from it checked with ``receive``."""

    index: int
    send: Crypto
    receive: Crypto


@dataclass(frozen=True, slots=True)
class Policy:
    """What this call may do: ``mode`` (``offer``/``require``/``off``), whether the B
    leg's transport may carry keys, and whether x-sipura could secure the call
    instead (the line has a Mini Certificate and the peer advertises x-sipura)."""

    mode: str
    transport_ok: bool
    xsipura_possible: bool = False


KeySource = Callable[[int], bytes]


@dataclass(slots=True)
class SdesCall:
    """SDES for one call's outside leg."""

    policy: Policy
    label: str
    outbound: bool
    """True: the phone called out (the proxy offers first); False: the peer called."""
    random: KeySource = field(default=secrets.token_bytes, repr=False)
    state: SdesState = SdesState.NONE
    offered: dict[int, list[Crypto]] = field(default_factory=dict, repr=False)
    """Outbound: the keys the proxy offered, per stream."""
    chosen: dict[int, Crypto] = field(default_factory=dict, repr=False)
    """The proxy's key in use (or to answer with), per stream."""
    theirs: dict[int, Crypto] = field(default_factory=dict, repr=False)
    """The peer's key, per stream."""
    savp: dict[int, bool] = field(default_factory=dict)
    """Inbound: the peer offered RTP/SAVP on that stream (the answer must say so too)."""
    keyed: int = 0
    """How many times keys were handed to the media (1 = first; more = re-keys)."""

    @property
    def active(self) -> bool:
        return self.state is SdesState.ACTIVE

    @property
    def enabled(self) -> bool:
        return self.policy.mode != "off" and self.policy.transport_ok

    # --- SDP toward the outside ---------------------------------------------------------

    def toward_outside(self, body: bytes, offer: bool) -> tuple[bytes, list[StreamKeys]]:
        """An SDP from the phone on its way out: add the proxy's keys."""
        if offer and not self._offers_keys():
            return body, []  # nothing to add: not worth a parse (every plain offer)
        sdp = parse_sdp(body)
        if offer:
            return self._offer_out(body, sdp), []
        return self._answer_out(body, sdp)

    def _offers_keys(self) -> bool:
        # declined once: a re-offer must not turn the call around
        return self.enabled and self.state is not SdesState.DECLINED

    def _offer_out(self, body: bytes, sdp: Sdp) -> bytes:
        if not self._offers_keys():
            return body
        protocol = secure_protocol if self.policy.mode == "require" else plain_protocol
        edits: list[CryptoEdit | None] = []
        for index, media in enumerate(sdp.media):
            if media.port == 0 or media.protocol.upper() not in SECURABLE:
                edits.append(None)
                continue
            keys = self._offer_keys(index)
            self.offered[index] = keys
            edits.append(CryptoEdit(protocol(media.protocol), tuple(keys)))
        if not self.offered:
            return body
        if self.state is not SdesState.ACTIVE:
            self.state = SdesState.OFFERED
        return rewrite_crypto(body, edits)

    def _offer_keys(self, index: int) -> list[Crypto]:
        """One key per suite, tags 1, 2...; in a re-offer of an active leg the key in use
        stays, first and under its tag (RFC 4568 §7.1.4), so the media keeps its state."""
        current = self.chosen.get(index) if self.active else None
        keys = [] if current is None else [current]
        for suite in SUITES:
            if current is None or current.suite != suite:
                tag = max((k.tag for k in keys), default=0) + 1
                keys.append(self._new_key(tag, suite))
        return keys

    def _answer_out(self, body: bytes, sdp: Sdp) -> tuple[bytes, list[StreamKeys]]:
        """The phone's answer to the peer's offer: the proxy's keys for the streams the
        peer keyed, with the protocol the peer offered."""
        if not self.theirs:
            return body, []
        edits: list[CryptoEdit | None] = []
        keys: list[StreamKeys] = []
        for index, media in enumerate(sdp.media):
            theirs, ours = self.theirs.get(index), self.chosen.get(index)
            if theirs is None or ours is None or media.port == 0:
                edits.append(None)
                continue
            wanted = secure_protocol if self.savp.get(index) else plain_protocol
            edits.append(CryptoEdit(wanted(media.protocol), (ours,)))
            keys.append(StreamKeys(index, ours, theirs))
        return rewrite_crypto(body, edits), self._keyed(keys)

    # --- SDP toward the phone -----------------------------------------------------------

    def toward_inside(
        self, body: bytes, offer: bool, *, final: bool = True
    ) -> tuple[bytes, list[StreamKeys]]:
        """An SDP from the peer on its way to the phone: learn its keys, strip them.
        ``final``: an answer in a final response (a provisional one without keys decides
        nothing: the final answer may still carry them)."""
        sdp = parse_sdp(body)
        keys = self._offer_in(sdp) if offer else self._answer_in(sdp, final)
        if not any(crypto_of(m)[1] or is_savp(m) for m in sdp.media):
            return body, keys
        return rewrite_crypto(body, list(strip_all(sdp))), keys

    def _offer_in(self, sdp: Sdp) -> list[StreamKeys]:
        """The peer offers: choose its first usable key per stream, and ours for it."""
        wanted = any(crypto_of(m)[0] for m in sdp.media)
        mandatory = any(is_savp(m) and m.port != 0 for m in sdp.media)
        best_effort_only = not mandatory
        if not wanted and not mandatory:
            return []  # a plain offer: SDES stays where it is (a re-INVITE may be plain)
        if not self.enabled or (best_effort_only and self.policy.xsipura_possible):
            if mandatory:
                raise SdesRefused("RTP/SAVP offered, but SDES is off or not over TLS here")
            self._decline("x-sipura preferred" if self.enabled else "SDES off on this leg")
            return []
        for index, media in enumerate(sdp.media):
            usable = crypto_of(media)[0]
            if media.port == 0 or not usable:
                if is_savp(media) and media.port != 0:
                    raise SdesRefused(f"no usable a=crypto on stream {index}")
                self.theirs.pop(index, None)
                continue
            theirs = usable[0]
            ours = self.chosen.get(index)
            if ours is None or self.theirs.get(index) != theirs:
                ours = self._new_key(theirs.tag, theirs.suite)  # a new peer key: a new one
            self.theirs[index] = theirs
            self.chosen[index] = ours
            self.savp[index] = is_savp(media)
        return []  # the media is keyed when the answer goes out (toward_outside)

    def _answer_in(self, sdp: Sdp, final: bool = True) -> list[StreamKeys]:
        """The peer answers the proxy's offer: the keys it picked, or none."""
        if not self.offered:
            return []
        keys: list[StreamKeys] = []
        for index, media in enumerate(sdp.media):
            offered = {k.tag: k for k in self.offered.get(index, [])}
            picked = next(
                (c for c in crypto_of(media)[0]
                 if c.tag in offered and offered[c.tag].suite == c.suite),
                None,
            )  # fmt: skip
            if picked is None or media.port == 0:
                continue
            ours = offered[picked.tag]
            self.chosen[index] = ours
            self.theirs[index] = picked
            keys.append(StreamKeys(index, ours, picked))
        if keys:
            return self._keyed(keys)
        if self.state is SdesState.ACTIVE or not final:
            return []  # a re-INVITE answered without crypto keeps what is agreed
        self.offered.clear()
        if self.policy.mode == "require" and not self.policy.xsipura_possible:
            self.state = SdesState.DECLINED
            raise SdesRefused("the answer has no usable a=crypto and sdes = require")
        self._decline("the peer answered without a=crypto")
        return []

    # --- results ------------------------------------------------------------------------

    def _keyed(self, keys: list[StreamKeys]) -> list[StreamKeys]:
        if not keys:
            return []
        first = self.state is not SdesState.ACTIVE
        self.state = SdesState.ACTIVE
        self.keyed += 1
        suites = ", ".join(sorted({k.receive.suite for k in keys}))
        log.info("call %s: SDES %s (%s, %d stream%s)", self.label,
                 "SRTP on the outside leg" if first else "keys renewed", suites, len(keys),
                 "" if len(keys) == 1 else "s")  # fmt: skip
        return keys

    def _decline(self, why: str) -> None:
        if self.state is not SdesState.DECLINED:
            log.info("call %s: no SDES: %s", self.label, why)
        self.state = SdesState.DECLINED

    def _new_key(self, tag: int, suite: str) -> Crypto:
        material = self.random(KEY_LENGTH + SALT_LENGTH)
        return Crypto(tag, suite, material[:KEY_LENGTH], material[KEY_LENGTH:])

    def withdraw(self, body: bytes) -> bytes:
        """The offer is going to a target keys must not travel to (a failover onto
        plain transport): no SDES for this call, ``body`` without keys."""
        self.offered.clear()
        self.policy = Policy(self.policy.mode, False, self.policy.xsipura_possible)
        self.state = SdesState.NONE
        return rewrite_crypto(body, list(strip_all(parse_sdp(body))))

    def describe(self) -> dict[str, object]:
        suites = sorted({c.suite for c in self.theirs.values()}) if self.active else []
        return {"state": self.state.value, "suites": suites, "keyed": self.keyed}
