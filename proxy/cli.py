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
    return parser


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
