"""Type stub of the C extension proxy.media._fastrelay (csrc/*.c): see fast_path.py."""

from collections.abc import Callable
from typing import Any

SEQ_AHEAD: int
COUNTERS: tuple[str, ...]

def rtp_shaped(data: bytes, /) -> bool: ...
def plain_reference(data: bytes, /) -> tuple[int, int]: ...
def refuse_plain_rtp(data: bytes, ssrc: int, seq: int, /) -> str | None: ...
def refuse_plain_rtcp(data: bytes, ssrc: int, /) -> str | None: ...
def valid_compound(data: bytes, /) -> bool: ...
def clear_compound(data: bytes, /) -> tuple[bytes, int]: ...
def plain_rtp(data: bytes, /) -> bool: ...
def plain_rtcp(data: bytes, /) -> bool: ...
def crypto() -> str: ...
def libsrtp_version() -> str: ...

class Srtp:
    keys: Any
    def __init__(self, keys: Any) -> None: ...
    def protect(self, packet: bytes, /) -> bytes: ...
    def unprotect(self, packet: bytes, /) -> bytes: ...
    def protect_rtcp(self, packet: bytes, /) -> bytes: ...
    def unprotect_rtcp(self, packet: bytes, /) -> bytes: ...

class ToneMix:
    tone: Any
    done: bool
    def __init__(
        self,
        tone: Any,
        bursts: tuple[tuple[int, int], ...],
        tables: Callable[[int], tuple[bytes, bytes]],
    ) -> None: ...
    def mix(self, packet: bytes, /) -> bytes | None: ...

class Leg:
    side: Any
    ip: str
    family: Any
    clock: Callable[[], float]
    index: int
    port: int
    alive: int
    hold: bool
    mux: bool
    latch_any: bool
    rtp: bool
    rx_first: bool
    seq_offset: int
    seq_last: int
    grace_ssrc: int
    grace_seq: int
    alt_until: float
    plain_until: float
    stale_until: float
    tx: Srtp | None
    rx: Srtp | None
    rtcp_tx: Srtp | None
    rtcp_rx: Srtp | None
    rx_alt: Srtp | None
    tone: ToneMix | None
    rtp_peer: tuple[Any, ...] | None
    rtcp_peer: tuple[Any, ...] | None
    rtp_dest: tuple[Any, ...] | None
    rtcp_dest: tuple[Any, ...] | None
    sdp_rtp: tuple[Any, ...] | None
    sdp_rtcp: tuple[Any, ...] | None
    expected_ip: str | None
    sockets: tuple[Socket, ...]
    stale: tuple[tuple[Any, Any], ...]
    tx_ssrc: bytes | None
    @property
    def seq_source(self) -> bytes: ...
    @property
    def plain_ref(self) -> tuple[int, int]: ...
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    rtcp_packets_in: int
    rtcp_packets_out: int
    packets_encrypted: int
    packets_decrypted: int
    plain_accepted: int
    plain_after_grace: int
    tone_packets: int
    tone_skipped: int
    relatched: int
    wrong_source: int
    no_destination: int
    srtp_auth: int
    srtp_replay: int
    srtp_protect: int
    send_error: int
    grace_not_rtp: int
    grace_wrong_ssrc: int
    grace_bad_sequence: int
    rtcp_invalid: int
    rtcp_stripped: int
    def __init__(
        self, side: Any, index: int, ip: str, family: Any, clock: Callable[[], float]
    ) -> None: ...
    def counters(self) -> tuple[int, ...]: ...
    def packed_counters(self) -> bytes: ...

class Relay:
    wakeups: int
    packets: int
    registered: int
    before: Callable[[], object] | None
    def fileno(self) -> int: ...
    def drain(self) -> None: ...
    def close(self) -> None: ...

class Socket:
    session: Any
    a: Any
    b: Any
    fd: int
    rtcp: bool
    registered: bool
    def __init__(self, relay: Relay, fd: int, rtcp: bool, session: Any, a: Leg, b: Leg) -> None: ...
    def register(self) -> None: ...
    def unregister(self) -> None: ...
    def forget_fd(self) -> None: ...
