"""Glue between SDP bodies and the media engine for one call.

Every SDP body that crosses the B2BUA, in either direction and in any message (INVITE,
18x, 2xx, ACK, UPDATE, re-INVITE), goes through :meth:`MediaHandle.relay_sdp`: the
sender's media addresses become the engine's expected peers on the sender's side (one
:class:`~proxy.media.commands.SetRemote` per stream), and the body handed to the other
side advertises the proxy's ports on that side. Nothing else in the SDP changes, so
codecs, ptime, telephone-event and direction attributes reach the far end as the near
end wrote them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.media.commands import Release, SetRemote, SetSrtp, SrtpKeys
from proxy.media.engine import MediaEngine, MediaSession, Side

if TYPE_CHECKING:
    from proxy.b2bua.sdes import StreamKeys
from proxy.sip.sdp import Sdp, connection_endpoint, parse_sdp, rewrite_sdp

log = logging.getLogger("sipura.media")


class MediaHandle:
    __slots__ = ("_engine", "_media_ip", "last_sent", "sdes_keys", "session", "streams")

    def __init__(
        self,
        engine: MediaEngine,
        session: MediaSession,
        streams: int,
        media_ip: dict[Side, str],
    ) -> None:
        self._engine = engine
        self.session = session
        self.streams = streams
        self._media_ip = media_ip
        self.last_sent: dict[Side, bytes] = {}
        """The last SDP handed to each side: a proxy-originated re-INVITE (caller-ID
        refresh) offers it again unchanged, so the media stays where it is."""
        self.sdes_keys: dict[int, StreamKeys] = {}
        """The SDES keys of each outside stream, as last agreed."""

    def relay_sdp(self, from_side: Side, body: bytes, parsed: Sdp | None = None) -> bytes:
        """Learn the sender's endpoints and return the body for the other side.

        ``parsed`` is ``body`` already parsed (the INVITE path parses its offer once, to
        size the allocation). Raises :class:`SdpError` for a body that is not SDP: the
        caller answers 488/400.
        """
        sdp = parsed if parsed is not None else parse_sdp(body)
        to_side = Side.OUTSIDE if from_side is Side.INSIDE else Side.INSIDE
        ports: list[int | None] = []
        for index in range(len(sdp.media)):
            if index >= self.streams:
                ports.append(0)  # beyond what was anchored: declined (RFC 3264 §6, §8.2)
                continue
            ip, rtp_port, rtcp_port, rtcp_mux = connection_endpoint(sdp, index)
            self._engine.apply(
                SetRemote(self.session.id, from_side, index, ip, rtp_port, rtcp_port, rtcp_mux)
            )
            ports.append(None if rtp_port == 0 else self.session.local(to_side, index)[1])
        rewritten = rewrite_sdp(body, self._media_ip[to_side], ports)
        self.last_sent[to_side] = rewritten
        return rewritten

    def set_sdes_keys(self, keys: list[StreamKeys]) -> None:
        """SRTP on the outside leg from now on, per stream, with the SDES keys: ours to
        send with, the peer's to check what it sends (SRTCP as well, as SDES peers do)."""
        for stream in keys:
            self.sdes_keys[stream.index] = stream
            send, receive = stream.send, stream.receive
            self._engine.apply(
                SetSrtp(
                    self.session.id, Side.OUTSIDE,
                    SrtpKeys(send.key, send.salt, send.suite), srtcp=True,
                    remote_keys=SrtpKeys(receive.key, receive.salt, receive.suite),
                    index=stream.index,
                )
            )  # fmt: skip

    def release(self) -> None:
        self._engine.apply(Release(self.session.id))
