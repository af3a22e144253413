"""The `curate` command line. Each verb lives in a module of `curate.commands` exposing
`register(subparsers)`; this file only wires them up and turns user errors into one-line messages."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rich.console import Console
from rich.text import Text

from curate import __version__
from curate.errors import CurateError
from safety.disk import disk_error_message
from safety.errors import SafetyError
from safety.redact import redact

# Markup off: an error quotes user text (paths, keys, values), which is shown as written, never styled.
error_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def print_error(message: str) -> None:
    """`error: <message>` on stderr, one line, credentials redacted."""
    error_console.print(Text.assemble(("error:", "bold red"), " ", redact(" ".join(str(message).split()))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate",
        description="Curate raw conversational data into fine-tuning sets: ingest, dedup, filter, label, split.",
    )
    parser.add_argument("--version", action="version", version=f"curate {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    import curate.commands as package

    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CurateError, SafetyError) as error:
        print_error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        error_console.print(Text("interrupted", style="bold red"))
        return 130
    except BrokenPipeError:
        return 1
    except Exception as error:  # noqa: BLE001 - only a full disk is turned into a message; the rest re-raise
        message = disk_error_message(error)
        if message is None:
            raise
        print_error(message)
        return 2


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
