"""`sipura-proxy` command line entry point.

Every failure the user can cause (bad arguments, unreadable files, malformed input)
ends as one line on stderr and exit code 2, never a traceback: operators script
against this tool, and a traceback is neither parseable nor a diagnosis.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from proxy import __version__
from proxy.errors import UsageError
from proxy.mc_tool import add_mc_commands


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sipura-proxy",
        description=(
            "Transparent SIP B2BUA that secures legacy phones' calls with the SPA "
            "x-sipura secure-call protocol, plus its Mini-Certificate tooling."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    add_mc_commands(commands)
    run = commands.add_parser("run", help="run the B2BUA (inside <-> outside)")
    run.add_argument("--config", required=True, metavar="FILE", help="TOML configuration")
    run.add_argument("--check", action="store_true", help="validate the config and exit")
    run.set_defaults(handler=_cmd_run)
    demo = commands.add_parser(
        "demo", help="two sites, two phones, one call that becomes secure (self-contained)"
    )
    demo.add_argument("--seconds", type=float, default=4.0, help="how long media runs")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.set_defaults(handler=_cmd_demo)
    calls = commands.add_parser("calls", help="list active calls of a running proxy")
    _admin_arguments(calls)
    calls.add_argument("--json", action="store_true")
    calls.set_defaults(handler=_cmd_calls)
    reload = commands.add_parser(
        "reload", help="make a running proxy reload its configuration file (as SIGHUP does)"
    )
    _admin_arguments(reload)
    reload.set_defaults(handler=_cmd_reload)
    return parser


def _admin_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="the admin endpoint, host:port or [v6addr]:port (default: the --config file's "
        "[admin] listen, else 127.0.0.1:5099)",
    )
    command.add_argument(
        "--config", metavar="FILE", help="take the endpoint and [admin] token from this config"
    )
    command.add_argument(
        "--token-file", metavar="FILE", help="file holding the admin bearer token (mode 0600)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.admin.routes import load_token
    from proxy.b2bua.config import load_config
    from proxy.b2bua.line_keys import load_security
    from proxy.b2bua.server import run
    from proxy.b2bua.tls_keys import load_tls

    config = load_config(args.config)  # ConfigError is a UsageError: one line, exit 2
    security = load_security(config)  # keys and certificates: checked before any socket
    tls = load_tls(config)  # the TLS certificate, key and their match, the trust store
    load_token(config)  # the token file's mode, like a key's
    if args.check:
        for warning in (*security.warnings, *tls.warnings):
            print(f"warning: {warning}", file=sys.stderr)
        if security.errors:
            # An expired line MC: `run` would start with that line in the clear.
            raise UsageError(security.errors[0])
        tls_note = f", TLS as {tls.subject}" if tls.subject else ""
        print(f"{args.config}: OK ({len(config.lines)} lines, {len(security.lines)} secure"
              f"{tls_note})")  # fmt: skip
        return 0
    return run(config)


def _cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    if not 1 <= args.seconds <= 60:
        raise UsageError("--seconds must be within 1..60")
    return run_demo(args.seconds, args.keep)


def _cmd_calls(args: argparse.Namespace) -> int:
    import json

    from proxy.admin.client import admin_request

    _, body = admin_request(args.admin, args.config, args.token_file, "GET", "/calls")
    try:
        calls = json.loads(body)
    except ValueError as exc:
        raise UsageError("the admin endpoint did not answer JSON") from exc
    if args.json:
        print(json.dumps(calls))
        return 0
    if not calls:
        print("no active calls")
        return 0
    rows = [("ID", "DIRECTION", "STATE", "SECURE", "LINE", "FLAGS", "CALL-ID (A LEG)")]
    rows += [
        (str(call["id"]), str(call["direction"]), str(call["state"]),
         _secure_state(call.get("secure")), str(call["line"] or "-"), _flags(call),
         str(call["a_call_id"]))
        for call in calls
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[-1])  # fmt: skip
    return 0


def _flags(call: dict[str, object]) -> str:
    """What else is true of a call: fax_clear, hold, NAT per side, forks, replacing."""
    flags = ["fax_clear"] if call.get("fax_clear") else []
    if call.get("on_hold"):
        flags.append("hold")
    nat = call.get("nat")
    if isinstance(nat, list) and nat:
        flags.append("nat:" + "+".join(str(side) for side in nat))
    forks = call.get("forks")
    if isinstance(forks, list) and forks:
        flags.append(f"forks:{len(forks)}")
    if call.get("replaces") is not None:
        flags.append(f"replaces:{call['replaces']}")
    if call.get("session_timer"):
        flags.append("session_timer")
    return ",".join(flags) or "-"


def _secure_state(secure: object) -> str:
    """``secure``, ``clear (reason)`` or ``pending``, from a call's ``secure`` field."""
    if not isinstance(secure, dict):
        return "clear (not requested)"
    state = secure.get("state")
    if state == "secure":
        return "secure"
    if state == "clear":
        return f"clear ({secure.get('reason') or 'unknown'})"
    return "pending"


def _cmd_reload(args: argparse.Namespace) -> int:
    from proxy.admin.client import admin_request

    status, body = admin_request(args.admin, args.config, args.token_file, "POST", "/reload")
    text = body.decode("utf-8", "replace").strip()
    if status != 200:
        raise UsageError(text or f"reload failed: HTTP {status}")
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code: int = args.handler(args)
    except UsageError as exc:
        text = str(exc)
        print(text if text.startswith("sipura-proxy") else f"sipura-proxy: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the contract: one line and exit 2, never a traceback
        print(f"sipura-proxy: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


def run() -> NoReturn:
    sys.exit(main())
