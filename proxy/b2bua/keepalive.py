"""Keep-alives toward phones behind NAT: OPTIONS over the flow they registered on.

A NAT forgets an idle UDP mapping in 30 s to a few minutes; after that an inbound call
to the phone never arrives. With ``[inside] keepalive_s`` the proxy sends an OPTIONS to
each registered contact it detected behind NAT (its Contact names another address than
the one its REGISTER came from), over that flow, every ``keepalive_s`` seconds: the
traffic keeps the mapping open, and a contact that stops answering (the OPTIONS times
out: Timer F) is dropped from the bindings and logged, so calls stop forking to a dead
device. Any response counts as an answer (a phone may well refuse OPTIONS with 405).
The deadlines are on a heap per binding, never a scan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.b2bua.bindings import Binding
from proxy.b2bua.deadlines import Deadlines
from proxy.b2bua.legs import new_call_id, new_tag
from proxy.b2bua.sides import Outbound, SipSides
from proxy.media.engine import Side
from proxy.sip.headers import format_hostport
from proxy.sip.message import Request, Response
from proxy.sip.transaction import ClientTransaction

if TYPE_CHECKING:
    from proxy.b2bua.registrar import Registrar

log = logging.getLogger("sipura.b2bua")


@dataclass(eq=False, slots=True)
class KeepaliveProbe:
    """Client-transaction context: an OPTIONS keep-alive to a registered contact."""

    binding: Binding
    sent_at: float


class Keepalive:
    def __init__(self, sides: SipSides, registrar: Registrar, interval_s: float) -> None:
        self.sides = sides
        self.registrar = registrar
        self.interval_s = interval_s
        self._due: Deadlines[tuple[str, str]] = Deadlines()
        self._outstanding: set[tuple[str, str]] = set()
        self.sent = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._due)

    def track(self, binding: Binding, now: float) -> None:
        """A binding was stored or refreshed: probe it if it is behind NAT."""
        key = (binding.aor, binding.key)
        if not self.interval_s or not binding.nat:
            self._due.arm(key, None)
            return
        if key not in self._due and key not in self._outstanding:
            self._due.arm(key, now + self.interval_s)

    def untrack(self, binding: Binding) -> None:
        key = (binding.aor, binding.key)
        self._due.arm(key, None)
        self._outstanding.discard(key)

    def next_deadline(self) -> float | None:
        return self._due.next_deadline()

    def poll(self, now: float) -> list[Outbound]:
        out: list[Outbound] = []
        for aor, key in self._due.due(now):
            binding = self.registrar.bindings.get(aor, key)
            if binding is None or not binding.nat:
                continue
            out += self._probe(binding, now)
        return out

    def _probe(self, binding: Binding, now: float) -> list[Outbound]:
        host, port = self.sides.advertised(Side.INSIDE)
        flow = binding.flow
        request = Request(method="OPTIONS", uri=binding.target)
        request.add("Via", self.sides.via(Side.INSIDE, flow.transport))
        request.add("Max-Forwards", "1")  # for the phone itself, never to be forwarded
        request.add("From", f"<sip:sipura@{format_hostport(host, port)}>;tag={new_tag()}")
        request.add("To", f"<{binding.contact}>")
        request.add("Call-ID", new_call_id(host))
        request.add("CSeq", "1 OPTIONS")
        self.sides.brand(request, request=True)
        self._outstanding.add((binding.aor, binding.key))
        self.sent += 1
        probe = KeepaliveProbe(binding, now)
        _, out = self.sides.send_request(Side.INSIDE, request, flow, now, probe)
        return out

    def on_response(
        self, probe: KeepaliveProbe, tx: ClientTransaction, response: Response, now: float
    ) -> list[Outbound]:
        """Any final answer: the phone and the NAT mapping are alive; probe again later."""
        if response.status < 200:
            return []
        binding = probe.binding
        key = (binding.aor, binding.key)
        self._outstanding.discard(key)
        current = self.registrar.bindings.get(*key)
        if current is not None and current.nat:
            self._due.arm(key, now + self.interval_s)
        return []

    def on_timeout(
        self, probe: KeepaliveProbe, tx: ClientTransaction, now: float
    ) -> list[Outbound]:
        """No answer at all: the device (or its NAT mapping) is gone."""
        binding = probe.binding
        key = (binding.aor, binding.key)
        self._outstanding.discard(key)
        current = self.registrar.bindings.get(*key)
        if current is None:
            return []
        if current.registered_at > probe.sent_at:  # it registered again meanwhile: alive
            self.track(current, now)
            return []
        self.dropped += 1
        self.registrar.forget(current, "no answer to keep-alive OPTIONS")
        return []
