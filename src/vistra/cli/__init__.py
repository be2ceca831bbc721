"""The `vistra` command: argument parsing only; each sub-command lives in its own module
here and calls functions of the library that users can call themselves."""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per sub-command, each with `register(subparsers)` that sets `func`.
COMMANDS = ["models", "data", "train", "eval", "predict", "export", "demo", "convert", "flops",
            "benchmark"]


def build_parser() -> argparse.ArgumentParser:
    from vistra import __version__

    parser = argparse.ArgumentParser(
        prog="vistra",
        description="Vision Transformers and Swin Transformers for image classification.",
    )
    parser.add_argument("--version", action="version", version=f"vistra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"vistra.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"vistra {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vistra {args.command}: interrupted", file=sys.stderr)
        return 130
