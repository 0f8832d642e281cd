"""Glue between SDP bodies and the media engine for one call.

Every SDP body that crosses the B2BUA, in either direction and in any message (INVITE,
18x, 2xx, ACK, UPDATE, re-INVITE), goes through :meth:`MediaHandle.relay_sdp`: the
sender's media addresses become the engine's expected peers on the sender's side, and
the body handed to the other side advertises the proxy's ports on that side (one
:class:`~proxy.media.commands.SetRemote` per stream). Nothing else in the SDP changes,
so codecs, ptime, telephone-event and direction attributes reach the far end as the near
end wrote them.

Three things are decided here per stream, from the SDP and the SIP it came in:

* **latching** (``[media] latch``, decision 48): ``auto`` latches a side to its SDP
  address (``sdp``) when that is the address its SIP comes from, and to the first
  packet from anywhere (``any``) when they differ: a phone behind NAT writes its
  private address in ``c=`` while its RTP arrives from the NAT's public one;
* the stream **kind** (RTP, or UDPTL/other datagrams by the m-line's transport): only
  RTP is ever SRTP-processed, renumbered or mixed with a tone;
* **hold** (sendonly, inactive or a null address in the last SDP from a side): the
  RTP-timeout check uses ``[media] rtp_timeout_onhold_s`` then.

Every m-line of an offer is anchored, up to ``[limits] max_streams_per_call`` (the
others are declined with port 0): an offer with more m-lines than the call's media
session has streams (the usual ``m=audio 0`` + ``m=image ... udptl t38`` re-INVITE)
anchors the extra ones on a further session of the same call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.b2bua.fax import stream_kind
from proxy.media.commands import Release, SetRemote, SetSrtp, SrtpKeys
from proxy.media.engine import MediaEngine, MediaSession, Side
from proxy.sip.sdp import (
    NULL_ADDRESSES,
    Direction,
    Sdp,
    connection_endpoint,
    parse_sdp,
    rewrite_sdp,
)

if TYPE_CHECKING:
    from proxy.b2bua.sdes import StreamKeys

log = logging.getLogger("sipura.media")

HOLD_DIRECTIONS = frozenset({Direction.SENDONLY, Direction.INACTIVE})

Allocate = Callable[[int], MediaSession]
"""Allocates a further session of N streams for the same call (raises PortsExhausted)."""


def latch_mode(setting: str, sdp_ip: str, signal_host: str | None) -> str:
    """``sdp`` or ``any`` for one stream: ``auto`` is ``sdp`` when the SDP address is the
    address the SIP message came from (no NAT between them), ``any`` otherwise."""
    if setting != "auto":
        return setting
    if signal_host is None or sdp_ip == signal_host:
        return "sdp"
    return "any"


def on_hold(sdp: Sdp) -> bool:
    """Every live stream (port != 0) is sendonly, inactive or at a null address."""
    live = [media for media in sdp.media if media.port]
    if not live:
        return False
    for media in live:
        connection = media.connection or sdp.connection
        if media.direction not in HOLD_DIRECTIONS and not (connection and connection.is_null):
            return False
    return True


class MediaHandle:
    __slots__ = (
        "_allocate",
        "_engine",
        "_held",
        "_kinds",
        "_latch",
        "_media_ip",
        "_sessions",
        "last_sent",
        "latch_setting",
        "max_streams",
        "sdes_keys",
        "session",
        "streams",
    )

    def __init__(
        self, engine: MediaEngine, session: MediaSession, streams: int,
        media_ip: dict[Side, str], latch_setting: str = "auto", allocate: Allocate | None = None,
        *, max_streams: int = 4,
    ) -> None:  # fmt: skip
        self._engine = engine
        self.session = session
        """The call's first session: stream 0 (the audio x-sipura secures) is on it."""
        self.streams = streams
        self._media_ip = media_ip
        self.latch_setting = latch_setting
        self.max_streams = max_streams
        """``[limits] max_streams_per_call``: m-lines beyond are declined (port 0); four
        INVITEs with 62 m-lines each once bound 992 of 1,000 ports."""
        self._allocate = allocate
        self._sessions: list[MediaSession] = [session]
        """Every session of the call, the first one first; stream i is on the session
        holding it in order (see :meth:`_where`)."""
        self.last_sent: dict[Side, bytes] = {}
        """The last SDP handed to each side: a proxy-originated re-INVITE (caller-ID
        refresh) offers it again unchanged, so the media stays where it is."""
        self._latch: dict[tuple[Side, int], str] = {}
        self._kinds: dict[int, str] = {}
        self._held: dict[Side, bool] = {}
        self.sdes_keys: dict[int, StreamKeys] = {}
        """The SDES keys of each outside stream, as last agreed."""

    # --- what the rest of the core reads ----------------------------------------------

    @property
    def sessions(self) -> list[MediaSession]:
        return list(self._sessions)

    @property
    def on_hold(self) -> bool:
        """Either side's last SDP put the call on hold."""
        return any(self._held.values())

    def nat_sides(self) -> list[str]:
        """The sides latched to ``any`` because NAT was detected (``auto``)."""
        if self.latch_setting != "auto":
            return []
        return sorted({side.value for (side, _), mode in self._latch.items() if mode == "any"})

    def latch_modes(self) -> dict[str, list[str]]:
        modes: dict[str, list[str]] = {}
        for (side, index), mode in sorted(self._latch.items()):
            streams = modes.setdefault(side.value, [])
            streams += ["?"] * (index + 1 - len(streams))
            streams[index] = mode
        return modes

    def kind(self, index: int) -> str:
        return self._kinds.get(index, "rtp")

    def audio_index(self) -> int | None:
        """The first RTP stream (where the secure-call tone goes), if any."""
        for index in range(self.session.streams):
            if self.kind(index) == "rtp":
                return index
        return None

    def packets_in(self) -> int:
        """Packets received on every stream of every session (RTP-timeout check)."""
        return sum(
            int(s["packets_in"])
            for session in self._sessions
            for streams in session.stats().values()
            for s in streams
        )

    # --- SDP --------------------------------------------------------------------------

    def relay_sdp(
        self, from_side: Side, body: bytes, parsed: Sdp | None = None, *,
        signal_host: str | None = None,
    ) -> bytes:  # fmt: skip
        """Learn the sender's endpoints and return the body for the other side.

        ``parsed`` is ``body`` already parsed (the INVITE path parses its offer once, to
        size the allocation); ``signal_host`` is where the SIP message carrying it came
        from (NAT detection). Raises :class:`SdpError` for a body that is not SDP: the
        caller answers 488/400.
        """
        sdp = parsed if parsed is not None else parse_sdp(body)
        to_side = from_side.other
        self._grow(len(sdp.media))
        ports: list[int | None] = []
        for index, media in enumerate(sdp.media):
            if index >= self.streams:
                # Beyond [limits] max_streams_per_call: declined (RFC 3264 §6, §8.2);
                # beyond what ports could be found for: passes through as is.
                ports.append(0 if index >= self.max_streams else None)
                continue
            self._kinds[index] = stream_kind(media.protocol)
            ip, rtp_port, rtcp_port, rtcp_mux = connection_endpoint(sdp, index)
            latch = latch_mode(self.latch_setting, ip, signal_host)
            if rtp_port and ip not in NULL_ADDRESSES:
                self._latch[(from_side, index)] = latch
            session, local_index = self._where(index)
            self._engine.apply(
                SetRemote(
                    session.id,
                    from_side,
                    local_index,
                    ip,
                    rtp_port,
                    rtcp_port,
                    rtcp_mux,
                    latch=latch,
                    kind=self._kinds[index],
                )
            )
            ports.append(None if rtp_port == 0 else session.local(to_side, local_index)[1])
        self._held[from_side] = on_hold(sdp)
        rewritten = rewrite_sdp(body, self._media_ip[to_side], ports, sdp)
        self.last_sent[to_side] = rewritten
        return rewritten

    def _grow(self, wanted: int) -> None:
        """Anchor every m-line: allocate a further session for streams beyond the ones
        the call has (no ports left: those streams pass through unanchored, logged)."""
        wanted = min(wanted, self.max_streams)
        if wanted <= self.streams or self._allocate is None:
            return
        try:
            extra = self._allocate(wanted - self.streams)
        except Exception as exc:  # PortsExhausted, or an engine refusing
            log.warning("media %s: no ports for %d more stream(s): %s", self.session.call_id,
                        wanted - self.streams, exc)  # fmt: skip
            return
        self._sessions.append(extra)
        self.streams += extra.streams

    def _where(self, index: int) -> tuple[MediaSession, int]:
        for session in self._sessions:
            if index < session.streams:
                return session, index
            index -= session.streams
        raise IndexError(index)

    def set_sdes_keys(self, keys: list[StreamKeys]) -> None:
        """SRTP on the outside leg from now on, per stream, with the SDES keys: ours to
        send with, the peer's to check what it sends (SRTCP as well, as SDES peers do)."""
        for stream in keys:
            if stream.index >= self.streams or self.kind(stream.index) != "rtp":
                continue  # SRTP is for RTP streams only (never UDPTL)
            self.sdes_keys[stream.index] = stream
            send, receive = stream.send, stream.receive
            session, index = self._where(stream.index)
            self._engine.apply(
                SetSrtp(
                    session.id, Side.OUTSIDE,
                    SrtpKeys(send.key, send.salt, send.suite), srtcp=True,
                    remote_keys=SrtpKeys(receive.key, receive.salt, receive.suite),
                    index=index,
                )
            )  # fmt: skip

    def release(self) -> None:
        for session in self._sessions:
            self._engine.apply(Release(session.id))
