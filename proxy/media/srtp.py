"""SRTP for one secured leg: AES_CM_128_HMAC_SHA1_80 (or _32) over libsrtp (pylibsrtp).

Only the relay builds these contexts (from the :class:`~proxy.media.commands.SrtpKeys`
of a media command, :meth:`SrtpContext.from_keys`): the call core deals in key values,
which can cross to a media worker process, never in libsrtp state.

Profile §3: RFC 3711, key derivation rate 0, initial ROC 0, the *same* master key in
both directions (the two sides' SSRCs differ, so the keystreams do), and libsrtp's
30-byte key input = 16-byte master key ‖ first 14 bytes of the 16-byte master salt.

libsrtp keeps per-SSRC stream state inside a session, and a session has one direction,
so a leg holds two sessions: outbound (``ssrc_any_outbound``) and inbound
(``ssrc_any_inbound``). A new master key means a new :class:`SrtpContext` (fresh ROC and
replay window), as §3 requires for re-keys.

pylibsrtp reports every failure as one ``pylibsrtp.Error`` with libsrtp's message; the
relay must tell an attack or a stale packet (auth / replay: drop and count) from a
packet it cannot protect (also drop and count, but a different counter), so they are
mapped to distinct exception types here. The hot path is a bound-method call inside a
``try``: the wrapper adds one Python frame per packet (see ``bench/crypto.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import pylibsrtp

from proxy.media.commands import SrtpKeys

MASTER_KEY_LENGTH = 16
MASTER_SALT_LENGTH = 16
LIBSRTP_SALT_LENGTH = 14
AUTH_TAG_LENGTH = 10
"""HMAC-SHA1-80 appends 10 bytes to every RTP packet."""


class SrtpError(Exception):
    """A packet libsrtp would not process. Subclasses say why."""


class SrtpAuthError(SrtpError):
    """Authentication tag did not verify: wrong key, tampering, or not SRTP at all."""


class SrtpReplayError(SrtpError):
    """Replay protection refused the packet (seen before, or too old for the window)."""


class SrtpProtectError(SrtpError):
    """libsrtp refused to protect an outbound packet (e.g. index too old after a jump)."""


class SrtpProtectReplayError(SrtpProtectError):
    """libsrtp refused to protect an outbound packet because its index was sent before
    (or is too old): the relay numbers it on afresh (:meth:`RelayLeg.renumber`)."""


_REPLAY_MESSAGES = frozenset(
    {
        "replay check failed (bad index)",
        "replay check failed (index too old)",
        "packet index is too old to consider",
    }
)


def _classify(exc: Exception) -> SrtpError:
    text = str(exc)
    if text == "authentication failure":
        return SrtpAuthError(text)
    if text in _REPLAY_MESSAGES:
        return SrtpReplayError(text)
    return SrtpError(text)


def libsrtp_key(master_key: bytes, master_salt: bytes) -> bytes:
    if len(master_key) != MASTER_KEY_LENGTH or len(master_salt) != MASTER_SALT_LENGTH:
        raise ValueError("master key and master salt must be 16 bytes each")
    return master_key + master_salt[:LIBSRTP_SALT_LENGTH]


_PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}
"""libsrtp's profile for each :data:`~proxy.media.commands.SRTP_PROFILES` name (the _32
suite shortens the RTP tag only; SRTCP keeps 80 bits, RFC 4568 §6.2)."""


def _session(key: bytes, ssrc_type: int, profile: str) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=key, ssrc_type=ssrc_type, srtp_profile=_PROFILES[profile])
    return pylibsrtp.Session(policy=policy)


class SrtpContext:
    """Both directions of one leg under one master key."""

    __slots__ = (
        "_protect",
        "_protect_rtcp",
        "_unprotect",
        "_unprotect_rtcp",
        "keys",
    )

    def __init__(self, master_key: bytes, master_salt: bytes) -> None:
        """x-sipura's keys (profile §3): a 16-byte master key and a 16-byte master salt
        (``ValueError`` otherwise). Any :class:`SrtpKeys`: :meth:`from_keys`."""
        libsrtp_key(master_key, master_salt)  # checks the lengths
        self._start(SrtpKeys(master_key, master_salt))

    @classmethod
    def from_keys(cls, keys: SrtpKeys) -> SrtpContext:
        """A fresh context (new replay windows, ROC 0) for ``keys``."""
        context = cls.__new__(cls)
        context._start(keys)
        return context

    def _start(self, keys: SrtpKeys) -> None:
        self.keys = keys
        """What it was made from: equal keys mean this very context (never log them)."""
        key = keys.master_key + keys.master_salt[:LIBSRTP_SALT_LENGTH]
        outbound = _session(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, keys.profile)
        inbound = _session(key, pylibsrtp.Policy.SSRC_ANY_INBOUND, keys.profile)
        # Bound methods resolved once: the per-packet path is a single call.
        self._protect: Callable[[bytes], bytes] = outbound.protect
        self._protect_rtcp: Callable[[bytes], bytes] = outbound.protect_rtcp
        self._unprotect: Callable[[bytes], bytes] = inbound.unprotect
        self._unprotect_rtcp: Callable[[bytes], bytes] = inbound.unprotect_rtcp

    def __repr__(self) -> str:
        return f"SrtpContext({self.keys.profile})"  # never show key material

    def protect(self, packet: bytes) -> bytes:
        """RTP -> SRTP. Raises :class:`SrtpProtectReplayError` for an index sent before,
        :class:`SrtpProtectError` if libsrtp refuses otherwise."""
        try:
            return self._protect(packet)
        except pylibsrtp.Error as exc:
            text = str(exc)
            if text in _REPLAY_MESSAGES:
                raise SrtpProtectReplayError(text) from None
            raise SrtpProtectError(text) from None
        except ValueError as exc:
            raise SrtpProtectError(str(exc)) from None

    def unprotect(self, packet: bytes) -> bytes:
        """SRTP -> RTP. Raises :class:`SrtpAuthError`, :class:`SrtpReplayError` or
        :class:`SrtpError` (e.g. too short to be SRTP)."""
        try:
            return self._unprotect(packet)
        except pylibsrtp.Error as exc:
            raise _classify(exc) from None
        except ValueError as exc:
            raise SrtpError(str(exc)) from None

    def protect_rtcp(self, packet: bytes) -> bytes:
        try:
            return self._protect_rtcp(packet)
        except (pylibsrtp.Error, ValueError) as exc:
            raise SrtpProtectError(str(exc)) from None

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        try:
            return self._unprotect_rtcp(packet)
        except pylibsrtp.Error as exc:
            raise _classify(exc) from None
        except ValueError as exc:
            raise SrtpError(str(exc)) from None
