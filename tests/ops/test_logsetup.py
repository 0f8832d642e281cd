"""Log format: UTC ISO 8601 with Z, JSON keeps tracebacks and carries call fields."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from proxy.logsetup import CallLog, bind_call, call_fields, configure_logging, iso_utc, set_level

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_iso_utc_is_utc_with_z() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


@pytest.mark.usefixtures("restore_root")
def test_json_keeps_tracebacks_and_call_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    log = logging.getLogger("sipura.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed")
    fields = call_fields(7, {"inside": "a@x", "outside": "b@y"}, "14085551234")
    log.info("call answered", extra=fields)
    CallLog(log, fields).warning("via the adapter %d", 1)
    with bind_call(call_fields(8, {"inside": "c@x"})):
        log.info("bound")
    log.info("plain")
    lines = _json_lines(capsys.readouterr().err)
    assert [e["msg"] for e in lines] == [
        "handler failed",
        "call answered",
        "via the adapter 1",
        "bound",
        "plain",
    ]
    assert all(ISO_Z.fullmatch(str(e["ts"])) for e in lines)
    assert "Traceback" in str(lines[0]["exc"]) and "ValueError: boom" in str(lines[0]["exc"])
    for entry in lines[1:3]:
        assert entry["call"] == 7
        assert entry["call_id"] == {"inside": "a@x", "outside": "b@y"}
        assert entry["line"] == "14085551234"
    assert lines[3]["call"] == 8 and "line" not in lines[3]
    assert "call" not in lines[4]


@pytest.mark.usefixtures("restore_root")
def test_text_format_utc_and_call_tag(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "text")
    log = logging.getLogger("sipura.test")
    log.info("hello", extra=call_fields(3, line="42"))
    log.debug("plain")
    set_level("warning")
    log.info("not shown")
    first, second = capsys.readouterr().err.splitlines()
    assert ISO_Z.fullmatch(first.split(" ")[0])
    assert first.endswith("INFO sipura.test: hello [call=3 line=42]")
    assert second.endswith("DEBUG sipura.test: plain")


@pytest.mark.usefixtures("restore_root")
def test_json_carries_the_end_of_call_summary(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    summary = {"ended_by": "phone", "media": {"inside": {"packets_in": 3}}}
    logging.getLogger("sipura.calls").info(
        "call 9 ended", extra={**call_fields(9, {"inside": "a@x"}), "summary": summary}
    )
    (entry,) = _json_lines(capsys.readouterr().err)
    assert entry["summary"] == summary and entry["call"] == 9
