"""Every table in benchmarks/ regenerated in one run: the scripts one after another, never two
at once (each would slow the other), each told where to write. The CPU and its flags are
recorded once at the top of each file written, and benchmarks/paths.png shows images/s per
path and model from inference.json.

    python benchmarks/all.py --fm-checkpoints runs/fm_vit/best.safetensors \\
        runs/fm_swin/best.safetensors --fm-test data/fashion_mnist/test   # hours on 2 cores
    python benchmarks/all.py --quick     # every script in its smallest mode, into a temporary
                                         # folder: a check that the whole set runs

Tables that need trained Fashion-MNIST checkpoints (the int8 and bf16 accuracy sections,
explain.md) take them from --fm-checkpoints (the ViT recipe's first, then the Swin recipe's)
and --fm-test, and say "not regenerated" otherwise; training them is fashion_mnist.py's job
(--train-fm runs it first, about an hour). architecture.md compares two source trees and needs
--before.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from inference import cpu_description  # noqa: E402

MACHINE = "Machine: "  # the line all.py writes under each file's title (replaced on a rerun)
NEEDS_FM = "not regenerated: pass --fm-checkpoints VIT SWIN --fm-test DIR"


@dataclass(frozen=True)
class Step:
    """One script: its arguments for a run (a string where it cannot run: the reason) and the
    files it writes, relative to the output folder."""

    script: str
    arguments: Callable[[argparse.Namespace, Path], list[str] | str]
    writes: tuple[str, ...]
    stdout_to: str | None = None  # a script that only prints: its output kept in this file


def fm_options(args: argparse.Namespace) -> list[str]:
    if not args.fm_checkpoints:
        return []
    return ["--fm-checkpoints", *map(str, args.fm_checkpoints), "--fm-test", str(args.fm_test)]


def inference_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [*(["--tiny"] if args.quick else []), "--out", str(out / "inference.md"),
            *fm_options(args)]


def bf16_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [*(["--tiny"] if args.quick else []), "--out", str(out / "bf16.md"), *fm_options(args)]


def peer_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [*(["--quick"] if args.quick else []), "--out", str(out / "results.md")]


def serving_args(args: argparse.Namespace, out: Path) -> list[str]:
    quick = ["--models", "vit_fmnist", "--clients", "1,2", "--requests", "5", "--direct-runs",
             "10", "--memory-requests", "50"]
    return [*(quick if args.quick else []), "--output", str(out / "serving.md")]


def fast_paths_args(args: argparse.Namespace, out: Path) -> list[str]:
    return ["--tiny"] if args.quick else []


def explain_args(args: argparse.Namespace, out: Path) -> list[str] | str:
    if len(args.fm_checkpoints) != 2:
        return NEEDS_FM
    vit, swin = args.fm_checkpoints
    return ["--vit", str(vit), "--swin", str(swin), "--data", str(args.fm_test), "--out",
            str(out), *(["--limit", "8", "--location-images", "8", "--location-epochs", "1",
                         "--steps", "8"] if args.quick else [])]


def fashion_mnist_args(args: argparse.Namespace, out: Path) -> list[str] | str:
    if not args.train_fm:
        return "not regenerated: trains both recipes (about an hour); pass --train-fm"
    return ["--out", str(out)]


def architecture_args(args: argparse.Namespace, out: Path) -> list[str] | str:
    if args.before is None:
        return "not regenerated: compares two source trees; pass --before TREE"
    return ["--before", str(args.before), "--out", str(out / "architecture.md"),
            *(["--tiny"] if args.quick else [])]


STEPS = [
    Step("fashion_mnist.py", fashion_mnist_args, ("fashion_mnist_results.md",)),
    Step("inference.py", inference_args, ("inference.md", "inference.json")),
    Step("bf16.py", bf16_args, ("bf16.md",)),
    Step("peer_comparison.py", peer_args, ("results.md", "results.json")),
    Step("serving.py", serving_args, ("serving.md",)),
    Step("fast_paths.py", fast_paths_args, ("fast_paths.txt",), stdout_to="fast_paths.txt"),
    Step("explain.py", explain_args, ("explain.md", "explain.json", "explain.png")),
    Step("architecture.py", architecture_args, ("architecture.md", "architecture.json")),
]


def machine_line() -> str:
    cpu, flags = cpu_description()
    return (f"{MACHINE}{cpu}; flags: {flags} (recorded by `python benchmarks/all.py` on "
            f"{datetime.date.today()}).")


def record_machine(path: Path, line: str) -> None:
    """`line` once at the top of a written table: under a markdown file's title, at the head
    of a text file; the line of an earlier run (and the blank line after it) is replaced."""
    lines = path.read_text().splitlines()
    for i, text in enumerate(lines):
        if text.startswith(MACHINE):
            del lines[i:i + (2 if lines[i + 1:i + 2] == [""] else 1)]
            break
    if lines and lines[0].startswith("# "):
        rest = lines[2:] if lines[1:2] == [""] else lines[1:]
        lines = [lines[0], "", line, "", *rest]
    else:
        lines = [line, "", *lines]
    path.write_text("\n".join(lines) + "\n")


def run_step(step: Step, arguments: list[str], out: Path) -> int:
    command = [sys.executable, str(HERE / step.script), *arguments]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    if step.stdout_to is None:
        return subprocess.run(command, cwd=HERE.parent).returncode
    done = subprocess.run(command, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    (out / step.stdout_to).write_text(done.stdout)
    print(done.stdout, end="", flush=True)
    return done.returncode


def plot_paths(figures: Path, png: Path) -> None:
    """images/s of every path of both libraries, per model, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(figures.read_text())
    rates = [r for r in data["rates"] if not isinstance(r["images_per_s"], str)]
    models = list(dict.fromkeys(r["model"] for r in data["rates"]))
    batches = sorted({r["batch"] for r in data["rates"]})
    keys = list(dict.fromkeys((r["library"], r["path"]) for r in data["rates"]))
    paths = list(dict.fromkeys(path for _, path in keys))
    colours = dict(zip(paths, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.8), squeeze=False)
    width = 0.8 / len(keys)
    for ax, batch in zip(axes[0], batches, strict=True):
        for k, (library, path) in enumerate(keys):
            values = [next((r["images_per_s"] for r in rates if r["model"] == model
                            and r["batch"] == batch and r["library"] == library
                            and r["path"] == path), 0.0) for model in models]
            ax.bar([i + (k - len(keys) / 2 + 0.5) * width for i in range(len(models))], values,
                   width, color=colours[path], hatch="//" if library != "vistra" else None,
                   edgecolor="white" if library == "vistra" else "black", linewidth=0.3,
                   label=f"{library} {path}")
        ax.set_xticks(range(len(models)), models)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("images/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, title="plain: vistra, hatched: HF")
    fig.suptitle(f"Inference paths, {data['threads']} threads: {data['cpu']} ({data['flags']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="each script in its smallest mode (--tiny / --quick)")
    parser.add_argument("--out", type=Path,
                        help="where the tables go (default: benchmarks/; with --quick a "
                             "temporary folder, so the committed tables stay)")
    parser.add_argument("--fm-checkpoints", type=Path, nargs="*", default=[],
                        metavar="CKPT", help="the Fashion-MNIST ViT and Swin recipe checkpoints")
    parser.add_argument("--fm-test", type=Path, metavar="DIR", help="their test folder")
    parser.add_argument("--train-fm", action="store_true",
                        help="train the recipes first (fashion_mnist.py, about an hour)")
    parser.add_argument("--before", type=Path, help="a source tree for architecture.py")
    args = parser.parse_args()
    if args.fm_checkpoints and not args.fm_test:
        parser.error("--fm-checkpoints needs --fm-test")
    out = args.out or (Path(tempfile.gettempdir()) / "vistra_benchmarks_quick" if args.quick
                       else HERE)
    out.mkdir(parents=True, exist_ok=True)
    line = machine_line()
    print(line, flush=True)
    summary, failed, start = [], 0, time.perf_counter()
    for step in STEPS:
        arguments = step.arguments(args, out)
        if isinstance(arguments, str):
            summary.append(f"{step.script}: {arguments}")
            continue
        began = time.perf_counter()
        code = run_step(step, arguments, out)
        seconds = time.perf_counter() - began
        written = [out / name for name in step.writes
                   if (out / name).exists() and (out / name).stat().st_mtime >= time.time()
                   - seconds - 1]
        for path in written:
            if path.suffix in (".md", ".txt"):
                record_machine(path, line)
        failed += code != 0
        state = f"exit {code}" if code else "ok"
        files = ", ".join(p.name for p in written) or "no file (this mode writes none)"
        summary.append(f"{step.script}: {state} in {seconds:.0f} s; wrote {files}")
    if (out / "inference.json").exists():
        plot_paths(out / "inference.json", out / "paths.png")
        summary.append(f"paths.png from {out / 'inference.json'}")
    if not args.fm_checkpoints:
        summary.append(f"inference.md, bf16.md: Fashion-MNIST sections {NEEDS_FM}")
    print(f"\n=== all done in {time.perf_counter() - start:.0f} s, into {out}")
    print("\n".join(f"- {s}" for s in summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
