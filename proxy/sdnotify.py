"""systemd's notify protocol (``Type=notify``), written out: one datagram per state.

The protocol is a few lines (sd_notify(3)): ``KEY=VALUE`` lines in one datagram to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Doing it here avoids a C-extension dependency (``systemd-python``) or a
wrapper package for that (docs/decisions.md, "systemd notify"). Nothing happens when
the variable is unset (not under systemd), and a send that fails is logged once and
otherwise ignored: the proxy must never stop serving calls because its supervisor's
socket went away.

``WATCHDOG_USEC`` (set by systemd when the unit has ``WatchdogSec=``) asks for a
``WATCHDOG=1`` ping at least that often; :meth:`Notifier.watchdog_interval` gives half
of it, the interval sd_watchdog_enabled(3) recommends. ``WATCHDOG_PID``, when set, must
be this process.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("sipura.sdnotify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self._watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isascii() and pid.isdigit() and int(pid) == os.getpid())
        if ours and usec.isascii() and usec.isdigit() and int(usec) > 0:
            self._watchdog_s = int(usec) / 1_000_000
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is asked for."""
        if self._watchdog_s is None or not self.enabled:
            return None
        return self._watchdog_s / 2

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased); True when the datagram went out."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd notify socket %s: %s", self.address.lstrip("\0"), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status, mainpid=os.getpid())

    def stopping(self, status: str) -> bool:
        return self.notify(stopping=1, status=status)

    def reloading(self, status: str) -> bool:
        return self.notify(reloading=1, status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
