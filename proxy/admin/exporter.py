"""``GET /metrics``: the proxy's state in Prometheus text format, via prometheus-client.

A custom collector reads a :class:`Snapshot` at scrape time (the proxy keeps no
Prometheus objects on its hot paths); prometheus-client does the text format, escaping
and the ``_total``/``_bucket`` conventions, and adds its process metrics
(``process_cpu_seconds_total``, ``process_resident_memory_bytes``, open fds...) for the
SIP process. The registry is per proxy, not the library's global one, so two proxies in
one test process do not mix.

Metric names and labels are a contract (README, "Operating"): extend, never rename.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.metrics import Histogram, MediaTotals, TransportCounters

__all__ = ["CONTENT_TYPE", "Exporter", "Snapshot"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ``/metrics`` reports, read from the proxy at one instant."""

    calls_active: Mapping[str, int]
    """By ``secure``: ``yes`` / ``no``."""
    calls_total: Mapping[str, int]
    """By ``direction``: ``outbound`` / ``inbound``."""
    secure_calls_total: Mapping[str, int]
    """By ``role``: ``caller`` / ``callee``."""
    clear_calls_total: Mapping[str, int]
    """By ``reason``, the ``/status`` ``clear_reasons`` keys."""
    handshake_seconds: Histogram
    media: MediaTotals
    """Released sessions plus live ones: cumulative."""
    media_ports_free: int
    media_workers_alive: int
    media_worker_restarts: int
    sip_responses: Mapping[int, int]
    line_mc_expiry: Mapping[str, float] = field(default_factory=dict)
    """Unix time each line's Mini Certificate expires, by ``user_id``."""
    sip_transports: Mapping[str, TransportCounters] = field(default_factory=dict)
    """By ``side``: ``inside`` / ``outside``."""


class _ProxyCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield _labelled(GaugeMetricFamily, "sipura_calls_active", "Calls in progress.",
                        "secure", s.calls_active)  # fmt: skip
        yield _labelled(CounterMetricFamily, "sipura_calls", "Calls set up (INVITEs admitted).",
                        "direction", s.calls_total)  # fmt: skip
        yield _labelled(CounterMetricFamily, "sipura_secure_calls",
                        "Calls whose outside leg became SRTP (x-sipura).", "role",
                        s.secure_calls_total)  # fmt: skip
        yield _labelled(CounterMetricFamily, "sipura_clear_calls",
                        "Secure attempts that ended in the clear, by reason.", "reason",
                        s.clear_calls_total)  # fmt: skip
        hist = HistogramMetricFamily(
            "sipura_handshake_seconds",
            "x-sipura handshake duration, first message to SRTP.",
            buckets=s.handshake_seconds.buckets(),
            sum_value=s.handshake_seconds.total,
        )
        yield hist
        packets = CounterMetricFamily(
            "sipura_media_packets", "RTP/RTCP packets relayed.", labels=("side", "direction")
        )
        for (side, direction), count in sorted(s.media.packets.items()):
            packets.add_metric((side, direction), count)
        yield packets
        yield _labelled(CounterMetricFamily, "sipura_media_drops", "Media packets dropped.",
                        "reason", s.media.drops)  # fmt: skip
        yield GaugeMetricFamily(
            "sipura_media_ports_free", "RTP/RTCP port pairs free.", value=s.media_ports_free
        )
        yield GaugeMetricFamily(
            "sipura_media_workers_alive", "Media worker processes alive.",
            value=s.media_workers_alive,
        )  # fmt: skip
        yield CounterMetricFamily(
            "sipura_media_worker_restarts", "Media worker processes restarted.",
            value=s.media_worker_restarts,
        )  # fmt: skip
        yield _labelled(CounterMetricFamily, "sipura_sip_responses",
                        "SIP responses sent or relayed, by status code.", "code",
                        {str(code): n for code, n in s.sip_responses.items()})  # fmt: skip
        yield _labelled(GaugeMetricFamily, "sipura_line_mc_expiry_timestamp_seconds",
                        "When each line's Mini Certificate expires (Unix time).", "user_id",
                        s.line_mc_expiry)  # fmt: skip
        yield from _transport_families(s.sip_transports)


def _transport_families(sides: Mapping[str, TransportCounters]) -> Iterator[Metric]:
    """The SIP transports' refusals and failures, one series per side (and reason or
    transport); the same counts ``/status`` shows under ``sip.transports``."""
    refused = CounterMetricFamily("sipura_sip_connections_refused",
                                  "TCP/TLS connections refused by a limit, by reason.",
                                  labels=("side", "reason"))  # fmt: skip
    closed = CounterMetricFamily("sipura_sip_connections_closed",
                                 "TCP/TLS connections closed by a timeout, by reason.",
                                 labels=("side", "reason"))  # fmt: skip
    too_large = CounterMetricFamily("sipura_sip_messages_too_large",
                                    "Messages past max_message_bytes (413 or dropped).",
                                    labels=("side", "transport"))  # fmt: skip
    handshakes = CounterMetricFamily("sipura_sip_tls_handshakes_failed",
                                     "Incoming TLS handshakes that failed or timed out.",
                                     labels=("side",))  # fmt: skip
    connects = CounterMetricFamily("sipura_sip_tls_connect_failures",
                                   "Outgoing TLS connections that could not be opened.",
                                   labels=("side",))  # fmt: skip
    for side, counters in sorted(sides.items()):
        for family, values in ((refused, counters.connections_refused),
                               (closed, counters.connections_closed),
                               (too_large, counters.messages_too_large)):  # fmt: skip
            for key, value in sorted(values.items()):
                family.add_metric((side, key), value)
        handshakes.add_metric((side,), counters.tls_handshakes_failed)
        connects.add_metric((side,), counters.tls_connect_failures)
    yield from (refused, closed, too_large, handshakes, connects)


def _labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    label: str,
    values: Mapping[str, float],
) -> Metric:
    family = kind(name, documentation, labels=(label,))
    for key, value in sorted(values.items()):
        family.add_metric((str(key),), value)
    return family


class Exporter:
    """One registry: the proxy collector plus the library's process collector."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ProxyCollector(snapshot))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
