"""`vistra train`: the options are generated from TrainConfig's fields, so the command line,
YAML recipes and the Python API can never disagree. Precedence: command line > --config
file > TrainConfig defaults."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable

import yaml

from vistra.train import TrainConfig, config_from_dict, load_config, resume, train
from vistra.train.allocator import keep_freed_memory
from vistra.train.loop import RESUME_OVERRIDES

_DICT_OPTION = "model_arg"  # --model-arg KEY=VALUE fills the model_kwargs mapping


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on an image folder",
        description="Train a ViT or Swin on an image folder (one sub-folder per class, or "
                    "train/ and val/ parts). Writes best.safetensors, last.ckpt, "
                    "metrics.jsonl, TensorBoard scalars and PNG plots to the run directory. "
                    "Under torchrun, trains on every process with DDP.")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of options (names as below, with _ or -); command-line "
                        "options override it")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from RUN_DIR/last.ckpt with its saved "
                        "options; it accepts only "
                        f"{', '.join('--' + o.replace('_', '-') for o in RESUME_OVERRIDES)} "
                        "(e.g. a lower --lr after a divergence: the rest of the schedule is "
                        "scaled to it). The data, process count and batch size must be the "
                        "run's.")
    add_config_arguments(p)
    p.set_defaults(func=run)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; unset options stay absent from the namespace."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata["help"]
        if default is not None and kind is not dict:
            help_text += f" (default: {' '.join(map(str, default)) if kind is tuple else default})"
        kw = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is dict:
            kw["dest"] = _DICT_OPTION
            parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", **kw)
        elif kind is tuple:
            parser.add_argument(flag, type=float, nargs=f.metadata["nargs"], metavar="X", **kw)
        else:
            metavar = f.metadata.get("metavar", {int: "N", float: "X", str: "TEXT"}[kind])
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"),
                                metavar=None if "choices" in f.metadata else metavar, **kw)
    # The older spelling of --amp, as recipes' bf16 key (vistra.train.config.read_amp):
    # --bf16 [true|false|auto], bare --bf16 true.
    parser.add_argument("--bf16", nargs="?", const=True, type=_bool_or_word(("auto",)),
                        metavar="true|false|auto", default=argparse.SUPPRESS,
                        help="the same as --amp bf16, off or auto")
    parser.add_argument("--no-bf16", action="store_const", const=False, dest="bf16",
                        default=argparse.SUPPRESS, help="the same as --amp off")


def _base_type(hint) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    return typing.get_origin(hint) or hint


def _bool_or_word(words: tuple[str, ...]) -> Callable[[str], bool | str]:
    """argparse type of a boolean option that also takes `words`."""
    values = {"true": True, "false": False, **{word: word for word in words}}
    *most, last = values

    def parse(text: str) -> bool | str:
        try:
            return values[text.lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"expected {', '.join(most)} or {last}, got "
                                             f"{text!r}") from None
    return parse


def _parse_model_args(items: list[str]) -> dict:
    """KEY=VALUE pairs, each VALUE read as YAML (so 4 is an int, 0.1 a float, true a bool)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg expects KEY=VALUE, e.g. patch_size=4; got {item!r}")
        parsed[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return parsed


def options_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig options given on the command line (and only those)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {"bf16"}
    given = {k: v for k, v in vars(args).items() if k in names}
    if hasattr(args, _DICT_OPTION):
        given["model_kwargs"] = _parse_model_args(getattr(args, _DICT_OPTION))
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = options_from_args(args)
    if args.config:
        return load_config(args.config, **given)
    return config_from_dict(given, source="command line")


def run(args: argparse.Namespace) -> int:
    keep_freed_memory()  # this process only trains: reuse its peak memory (allocator.py)
    if args.resume:
        given = options_from_args(args)
        extra = sorted(set(given) - set(RESUME_OVERRIDES)) + (["config"] if args.config else [])
        if extra:
            raise ValueError(
                f"--resume continues {args.resume} with its saved options; drop "
                f"{', '.join('--' + e.replace('_', '-') for e in extra)} (it accepts "
                f"{', '.join('--' + o.replace('_', '-') for o in RESUME_OVERRIDES)}; or start "
                f"a new run with --config {args.resume}/config.yaml and your changes)")
        device = given.pop("device", None)
        resume(args.resume, device=device, **given)
        return 0
    train(config_from_args(args))
    return 0
