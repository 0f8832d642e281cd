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
    calls.add_argument("--admin", default="127.0.0.1:5099", metavar="HOST:PORT")
    calls.add_argument("--json", action="store_true")
    calls.set_defaults(handler=_cmd_calls)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.b2bua.config import load_config
    from proxy.b2bua.line_keys import load_security
    from proxy.b2bua.server import run

    config = load_config(args.config)  # ConfigError is a UsageError: one line, exit 2
    security = load_security(config)  # keys and certificates: checked before any socket
    if args.check:
        for warning in security.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.config}: OK ({len(config.lines)} lines, {len(security.lines)} secure)")
        return 0
    return run(config)


def _cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    if not 1 <= args.seconds <= 60:
        raise UsageError("--seconds must be within 1..60")
    return run_demo(args.seconds, args.keep)


def _cmd_calls(args: argparse.Namespace) -> int:
    import json
    import socket

    host, _, port = args.admin.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5) as conn:
            conn.sendall(b"GET /calls HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot reach the admin endpoint {args.admin}: {exc}") from exc
    body = data.split(b"\r\n\r\n", 1)[-1]
    try:
        calls = json.loads(body)
    except ValueError as exc:
        raise UsageError(f"admin endpoint {args.admin} did not answer JSON") from exc
    if args.json:
        print(json.dumps(calls))
        return 0
    if not calls:
        print("no active calls")
    for call in calls:
        print(f"{call['id']:>6} {call['direction']:<16} {call['state']:<11} "
              f"line={call['line'] or '-'} a={call['a_call_id']}")  # fmt: skip
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
