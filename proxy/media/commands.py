"""Media effects as values: the commands the call core gives the media engine, and the
events the engine reports back.

The B2BUA core is sans-IO. While it handles a SIP message it decides what the media must
do (relay toward the address a peer's SDP gave, accept or switch to SRTP, play the
secure-call tone, let a session go), and it must not care whether the relay runs in
this process or in a worker process. So every effect is a frozen dataclass of plain
values that names its session by the engine-assigned :attr:`MediaSession.id
<proxy.media.engine.MediaSession.id>`: the in-process relay applies it directly
(:meth:`RelayEngine.apply <proxy.media.relay.RelayEngine.apply>`, one handler per
command type in a table), the worker pool sends it as-is over the channel
(:mod:`proxy.media.channel` encodes any of these dataclasses from its field types), and
the worker process hands it to its own relay's ``apply``. Adding a media operation is a
dataclass here and a handler in :mod:`proxy.media.relay_session`: two files.

The semantics are the relay's (see each command and :mod:`proxy.media.relay`):
symmetric-RTP latching, the SRTP switch-over and its grace window (profile §3), the
one-shot "SRTP authenticated" report, tone mixing. Key material travels as
:class:`SrtpKeys`, never as a libsrtp context: only the relay builds contexts
(:class:`proxy.media.srtp.SrtpContext`), and a command whose keys equal those of a
context the side already uses keeps that context, with its replay window and rollover
counter (a ``SwitchSrtp`` after an ``AcceptSrtp`` of the same keys goes on where
accepting left off). Keys never appear in a ``repr``.

Events (:data:`MediaEvent`) come back through :attr:`MediaEngine.on_event
<proxy.media.engine.MediaEngine.on_event>`, which the I/O edge sets; it hands them to the
core (:meth:`B2BUA.on_media_event <proxy.b2bua.core.B2BUA.on_media_event>`) on a later
loop iteration, never from inside an ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, TypeAlias, get_args

from proxy.media.engine import Side, StreamStats
from proxy.media.tones import Tone

__all__ = [
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "SRTP_PROFILES",
    "AcceptSrtp",
    "ClearSrtp",
    "MediaCommand",
    "MediaEvent",
    "MediaFlowing",
    "MediaReleased",
    "PlayTone",
    "Release",
    "SessionsLost",
    "SetRemote",
    "SetSrtp",
    "SetTxSsrc",
    "SrtpAuthenticated",
    "SrtpKeys",
    "SwitchSrtp",
    "WatchSrtp",
]

SRTP_PROFILES: Final = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
"""The crypto suites an :class:`SrtpKeys` may name (RFC 4568 names). x-sipura uses the
first (profile §3)."""


@dataclass(frozen=True, slots=True)
class SrtpKeys:
    """Key material for one side, never a libsrtp context. Two equal values are the
    same key: the relay keeps one context for them."""

    master_key: bytes = field(repr=False)
    """16 bytes."""
    master_salt: bytes = field(repr=False)
    """14 bytes (SDES), or 16 (x-sipura: only the first 14 are used, profile §3)."""
    profile: str = "AES_CM_128_HMAC_SHA1_80"

    def __post_init__(self) -> None:
        if len(self.master_key) != 16 or len(self.master_salt) not in (14, 16):
            raise ValueError("an SRTP master key is 16 bytes and its salt 14 or 16")
        if self.profile not in SRTP_PROFILES:
            raise ValueError(f"unknown SRTP profile {self.profile!r}")


# --- commands: core -> engine ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetRemote:
    """The peer of ``side`` for stream ``index``, as its SDP says.

    Until a packet arrives the engine sends to this address; the first packet from
    ``ip`` (any port, for NAT) becomes the peer (symmetric RTP latching), and after that
    packets from anywhere else are dropped. ``latch`` ``"any"`` (the core detected NAT,
    or ``[media] latch = "any"``): the first packet from any address latches. Either
    way a packet from the exact SDP address and port takes the latch over (counted as
    ``relatched``), and on an SRTP side only a packet that authenticated latches. Hold
    (``ip`` 0.0.0.0 / ``::`` or ``rtp_port`` 0) stops sending to that side until a new
    address is set; a changed address re-arms latching. ``rtcp_mux``: RTCP shares the
    RTP port on that side. Whatever port RTCP arrives on, only a valid compound RTCP
    packet is relayed (:mod:`proxy.media.rtcp`). ``kind`` ``"rtp"``, or the m-line's
    non-RTP transport (``"udptl"`` for T.38, ``"udp"``): a non-RTP stream is relayed
    byte for byte, never SRTP-processed, renumbered or mixed with a tone. Raises
    ``ValueError`` (a port out of range, an address not of the side's family) or
    ``IndexError`` (no such stream) when applied."""

    session: int
    side: Side
    index: int
    ip: str
    rtp_port: int
    rtcp_port: int
    rtcp_mux: bool = False
    latch: str = "sdp"
    kind: str = "rtp"


@dataclass(frozen=True, slots=True)
class SetSrtp:
    """SRTP both ways on ``side`` now, no grace: packets sent toward it are protected
    with ``keys``, packets from it must unprotect or are dropped and counted. ``srtcp``
    (default on here, unlike the switch-over commands): RTCP as well. None is
    :class:`ClearSrtp`. ``remote_keys``: the key the peer protects with, when it is not
    ``keys`` (SDES, RFC 4568: each end announces the key it sends with). ``index``: one
    stream only (SDES keys are per ``m=`` line); None: every stream of the side."""

    session: int
    side: Side
    keys: SrtpKeys | None
    srtcp: bool = True
    remote_keys: SrtpKeys | None = None
    index: int | None = None


@dataclass(frozen=True, slots=True)
class AcceptSrtp:
    """Start accepting SRTP under ``keys`` from ``side`` without sending it (the caller
    after sending Caller Final, profile §3). Packets from ``side`` are tried with
    ``keys``; if that fails, with the key being sent now, if any (a re-key), and
    otherwise relayed as plain RTP when the side sends plain now and the packet is the
    peer's plain stream going on (its SSRC and next sequence numbers:
    :mod:`proxy.media.grace`), until a packet under ``keys`` authenticates (the peer has
    switched). Only an authenticated packet latches. ``srtcp``: RTCP from ``side`` is
    SRTCP too."""

    session: int
    side: Side
    keys: SrtpKeys
    srtcp: bool = False


@dataclass(frozen=True, slots=True)
class SwitchSrtp:
    """Switch-over (profile §3): from now on, packets sent toward ``side`` are protected
    with ``keys``. Packets from ``side`` are tried with ``keys``, then with the previous
    key (a re-key: it stays valid until now + ``grace_s``), then, if ``side`` was plain
    before this switch and the grace window is still open, relayed as plain RTP if it
    is the peer's plain stream going on (:mod:`proxy.media.grace`: else dropped as
    ``grace_not_rtp``, ``grace_wrong_ssrc`` or ``grace_bad_sequence``); otherwise
    dropped and counted (``srtp_auth`` or ``srtp_replay``, and ``plain_after_grace`` if
    the packet looked plain). The window closes early when a packet from ``side``
    authenticates under ``keys``, and does not open if one already has (the peer
    switched first). A re-key does not reopen plain,
    and a replayed SRTP packet is never relayed as plain. Only an authenticated packet
    latches. "Now" is the engine's clock when it applies the command; the grace window
    is a deadline read only when a packet fails to authenticate. ``srtcp``: protect and
    unprotect RTCP as well; otherwise RTCP stays in the clear, and toward ``side`` only
    its SR, RR, SDES and BYE packets leave (:mod:`proxy.media.rtcp`). ``grace_s`` must be
    finite and >= 0 (``ValueError``)."""

    session: int
    side: Side
    keys: SrtpKeys
    grace_s: float
    srtcp: bool = False


@dataclass(frozen=True, slots=True)
class ClearSrtp:
    """Back to plain RTP and RTCP both ways on ``side`` (a handshake fell back)."""

    session: int
    side: Side


@dataclass(frozen=True, slots=True)
class SetTxSsrc:
    """Write ``ssrc`` into RTP sent toward ``side`` while it is SRTP (None: the sender's
    own). x-sipura announces the SSRC it will encrypt with. Stream 0 only."""

    session: int
    side: Side
    ssrc: int | None


@dataclass(frozen=True, slots=True)
class PlayTone:
    """Mix ``tone`` into the audio of stream ``index`` sent toward ``side`` (G.711 PT
    0/8; other payload types are counted as ``tone_skipped``), starting with the next
    packet; a tone already playing there is replaced. None stops it."""

    session: int
    side: Side
    index: int
    tone: Tone | None


@dataclass(frozen=True, slots=True)
class WatchSrtp:
    """Report :class:`SrtpAuthenticated` once, the first time a packet from ``side``
    authenticates under the key given last by :class:`AcceptSrtp` / :class:`SwitchSrtp` /
    :class:`SetSrtp` (the handshakes' ``srtp_authenticated``). If that key already
    authenticated, the report comes on a later loop iteration. Giving the side other
    keys (or clearing it) forgets a watch that has not fired. ``ValueError`` when the
    side has no key."""

    session: int
    side: Side


@dataclass(frozen=True, slots=True)
class Release:
    """End the session: its sockets are closed and their ports given back (or kept in
    the engine's pool of open pairs for a later call). Commands for a released session
    are ignored, so releasing twice is harmless."""

    session: int


MediaCommand: TypeAlias = (
    SetRemote | SetSrtp | AcceptSrtp | SwitchSrtp | ClearSrtp | SetTxSsrc | PlayTone
    | WatchSrtp | Release
)  # fmt: skip

COMMAND_TYPES: Final[tuple[type[MediaCommand], ...]] = get_args(MediaCommand)
"""Every command type: what an engine's dispatch table must cover."""


# --- events: engine -> core ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SrtpAuthenticated:
    """A packet from ``side`` authenticated under its current key (a :class:`WatchSrtp`
    fired)."""

    session: int
    side: Side


@dataclass(frozen=True, slots=True)
class SessionsLost:
    """These sessions relay nothing any more (their media worker process died): their
    calls must end. ``reason`` is for the log."""

    sessions: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class MediaFlowing:
    """The first packet from ``side`` reached stream 0 of the session (once per side
    and session, from an engine whose ``reports_flowing`` is true). The x-sipura caller
    starts stage 2 only once the phone's RTP flows (profile §2): told so, a call waiting
    for it polls nothing."""

    session: int
    side: Side


@dataclass(frozen=True, slots=True)
class MediaReleased:
    """A released session's final counters (as :meth:`MediaSession.stats
    <proxy.media.engine.MediaSession.stats>` has them), from an engine whose
    ``reports_final`` is true: once per released session, exact once the session's
    sockets are closed, the last reported ones if its worker died first."""

    session: int
    stats: dict[Side, list[StreamStats]] = field(hash=False)


MediaEvent: TypeAlias = SrtpAuthenticated | SessionsLost | MediaFlowing | MediaReleased

EVENT_TYPES: Final[tuple[type[MediaEvent], ...]] = get_args(MediaEvent)
