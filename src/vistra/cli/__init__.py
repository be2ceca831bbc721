"""The `vistra` command: argument parsing only; each sub-command lives in its own module
here and calls functions of the library that users can call themselves."""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per sub-command, each with `register(subparsers)` that sets `func`.
COMMANDS = ["models", "data", "train", "eval", "predict", "explain", "export", "demo", "convert",
            "flops", "benchmark", "serve"]


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
    """Run a sub-command; an error ends it with one line on standard error and status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"vistra {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = error_message(err)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        print(f"vistra {args.command}: error: {message}", file=sys.stderr)
        return 2


def error_message(err: Exception) -> str | None:
    """The one-line message for an error a user can act on, or None for an unexpected one."""
    from vistra.train.distributed import PeerError

    if isinstance(err, MemoryError) or (
            isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        return ("out of memory; lower --batch-size or --workers, turn off --cache-images, or "
                "remove the oversized images")
    if isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict"):
        detail = " ".join(str(err).split())
        return (f"a checkpoint's weights do not fit the model it describes ({detail[:300]}); "
                "it was edited, or written by another version of vistra")
    if isinstance(err, PermissionError):
        return (f"{err.filename or err}: permission denied; check that you may read (inputs) or "
                "write (outputs) there, or choose another path")
    if isinstance(err, (ValueError, FloatingPointError, PeerError)):
        text = str(err)
    elif isinstance(err, OSError):  # FileNotFoundError, FileExistsError, a full disk...
        text = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    else:
        return None
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
