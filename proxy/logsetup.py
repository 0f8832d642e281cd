"""Logging set-up shared by the proxy and its media worker processes: one handler on
stderr, text or one JSON object per line (``[log] format``).

Timestamps are ISO 8601 in UTC with a ``Z`` and milliseconds in both formats: logs from
several hosts and from the media workers are merged and sorted by that field, and a
local time without a zone cannot be sorted across a daylight-saving change.

Call-related lines carry three fields, ``call`` (the proxy's call number), ``call_id``
(each leg's Call-ID, by side: ``{"inside": ..., "outside": ...}``) and ``line`` (the
line's user id), so one call can be followed through a JSON log with one filter. They
come from either of two places, whichever is cheaper for the caller:

* ``extra=call_fields(...)`` on a log call, or a :class:`CallLog` adapter built once per
  call (one dict merge per line logged, nothing when the level is off);
* :func:`bind_call`, a context manager setting a context variable for everything logged
  while one call's event is handled (one ``ContextVar.set``/``reset`` per event, the log
  calls themselves unchanged).

In text format they are appended as ``[call=3 line=14085551234]`` when present.
Tracebacks (``exc_info``, ``stack_info``) are kept: in JSON as the ``exc`` / ``stack``
strings, in text as the stdlib formatter writes them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import Any, Final

__all__ = [
    "CALL_FIELDS",
    "JSON_FIELDS",
    "CallContextFilter",
    "CallLog",
    "bind_call",
    "call_fields",
    "configure_logging",
    "iso_utc",
    "set_level",
]

CALL_FIELDS: Final = ("call", "call_id", "line")
"""The record attributes a call-related line carries (see the module docstring)."""
JSON_FIELDS: Final = (*CALL_FIELDS, "summary")
"""Record attributes a JSON line carries when set: the call fields, and the end-of-call
``summary`` object (:mod:`proxy.b2bua.call_summary`)."""

_bound: ContextVar[Mapping[str, Any] | None] = ContextVar("sipura_log_call", default=None)


def iso_utc(created: float) -> str:
    """``2025-01-31T12:34:56.789Z``: ISO 8601, UTC, milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def call_fields(
    call: int, call_ids: Mapping[str, str] | None = None, line: str | None = None
) -> dict[str, Any]:
    """The ``extra=`` mapping for one call: its number, its legs' Call-IDs by side, its
    line's user id (``None`` when it has no configured line)."""
    return {"call": call, "call_id": dict(call_ids or {}), "line": line}


class CallLog(logging.LoggerAdapter[logging.Logger]):
    """A logger for one call: every line it logs carries the call's fields.

    Built once per call; the fields may be updated in place (``fields["call_id"]``) when
    a leg learns its Call-ID."""

    fields: dict[str, Any]

    def __init__(self, logger: logging.Logger, fields: Mapping[str, Any]) -> None:
        super().__init__(logger, dict(fields))
        self.fields: dict[str, Any] = dict(fields)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = kwargs.get("extra")
        kwargs["extra"] = {**self.fields, **extra} if extra else self.fields
        return msg, kwargs


class bind_call:
    """Everything logged inside the block (in this task or thread) carries ``fields``,
    unless a log call passes its own.

    A class rather than a ``contextlib.contextmanager`` generator: the call core binds
    once per message that belongs to a call, and this costs a third of the generator's
    ~1 µs."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields
        self._token: Token[Mapping[str, Any] | None] | None = None

    def __enter__(self) -> None:
        self._token = _bound.set(self._fields)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _bound.reset(self._token)
            self._token = None


class CallContextFilter(logging.Filter):
    """Copies the bound call fields onto records that do not carry their own (on the
    process's handler; a test puts one on its capturing handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _bound.get()
        if bound is not None and not hasattr(record, "call"):
            for name, value in bound.items():
                setattr(record, name, value)
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        call = getattr(record, "call", None)
        if call is None:
            return text
        line = getattr(record, "line", None)
        tag = f" [call={call}" + (f" line={line}]" if line else "]")
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return head + tag + newline + rest


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in JSON_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(level_name: str, fmt: str) -> None:
    """One stderr handler for the whole process, replacing any earlier one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(CallContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level_name)


def set_level(level_name: str) -> None:
    """Change the level at run time (a configuration reload)."""
    logging.getLogger().setLevel(getattr(logging, level_name.upper(), logging.INFO))
