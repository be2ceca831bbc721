"""Fashion-MNIST from scratch on a CPU: export, train both recipes, test, tabulate.

    python benchmarks/fashion_mnist.py            # both recipes, one after the other
    python benchmarks/fashion_mnist.py --parallel # both at once, one thread each

Steps, each skipped when its result is already there, so an interrupted benchmark is
continued by running the same command again:
1. `vistra data fashion-mnist DATA` (60,000 train / 10,000 test PNGs) unless DATA holds them.
2. `vistra train --config recipes/fashion_mnist_<name>.yaml --data DATA/train` per recipe;
   validation (and so the choice of best.safetensors) comes from the recipe's val_fraction
   of DATA/train. A run cut short is continued with `vistra train --resume`.
3. `vistra eval RUN/best.safetensors --data DATA/test --json`, without and with `--tta-flip`:
   the 10,000 test images, seen here for the first time.
4. benchmarks/fashion_mnist_results.md (the table) and fashion_mnist_<name>_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from vistra.accel import probe
from vistra.analysis.flops import count_macs
from vistra.train.logger import CURVES_FILE, read_metrics
from vistra.weights import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"vit": ROOT / "recipes" / "fashion_mnist_vit.yaml",
           "swin": ROOT / "recipes" / "fashion_mnist_swin.yaml"}
EXPECTED = {"train": 60_000, "test": 10_000}
WALL_FILE = "benchmark_wall.json"  # training wall seconds, summed over resumed invocations


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "fashion_mnist",
                   help="export folder (default: %(default)s)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "fashion_mnist",
                   help="one run directory per recipe under here (default: %(default)s)")
    p.add_argument("--source", help="folder of the IDX files (default: the Debian package's)")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["vit", "swin"])
    p.add_argument("--parallel", action="store_true",
                   help="train the recipes at the same time, --threads each (default: 1)")
    p.add_argument("--threads", type=int,
                   help="torch threads per training (default: all cores, or 1 with --parallel)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks",
                   help="where the table and curves go (default: %(default)s)")
    return p.parse_args()


def vistra(*args: str, threads: int | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-m", "vistra", *args], env=env, **kw)


def check(proc: subprocess.Popen, what: str) -> None:
    if proc.wait():
        sys.exit(f"{what} failed (exit code {proc.returncode}); see its messages above")


def ensure_data(data: Path, source: str | None) -> None:
    counts = {part: sum(1 for _ in (data / part).glob("*/*.png")) for part in EXPECTED}
    if counts == EXPECTED:
        print(f"{data}: already exported", flush=True)
        return
    if any(counts.values()):
        sys.exit(f"{data} holds a partial export ({counts}); delete it and run again")
    print(f"exporting Fashion-MNIST to {data}", flush=True)
    check(vistra("data", "fashion-mnist", str(data), *(["--source", source] if source else [])),
          "export")


def finished(run_dir: Path, epochs: int) -> bool:
    history = read_metrics(run_dir)
    # a time budget may have ended the run before the recipe's `epochs` (its maximum)
    done = bool(history) and history[-1]["epoch"] >= history[-1].get("epochs", epochs)
    return done and (run_dir / "best.safetensors").exists()


def train_command(name: str, run_dir: Path, data: Path) -> list[str]:
    if (run_dir / "last.ckpt").exists():
        print(f"{name}: continuing {run_dir}", flush=True)
        return ["train", "--resume", str(run_dir)]
    print(f"{name}: training into {run_dir}", flush=True)
    return ["train", "--config", str(RECIPES[name]), "--data", str(data / "train"),
            "--output", str(run_dir)]


def train_all(names: list[str], args: argparse.Namespace, recipes: dict[str, dict]) -> None:
    """Train every unfinished recipe (all at once with --parallel, their output then going
    to RUN/train.log), booking each run's wall time when it ends, even by Ctrl-C."""
    todo = [n for n in names if not finished(args.runs / n, recipes[n]["epochs"])]
    threads = args.threads or (1 if args.parallel else None)
    for group in [todo] if args.parallel else [[n] for n in todo]:
        start = time.time()
        procs = {}
        for n in group:
            (args.runs / n).mkdir(parents=True, exist_ok=True)
            log = open(args.runs / n / "train.log", "a") if args.parallel else None
            procs[n] = vistra(*train_command(n, args.runs / n, args.data), threads=threads,
                              stdout=log, stderr=log)
            if log is not None:
                log.close()  # the child holds its own copy
        running = dict(procs)
        try:
            while running:
                for n in [n for n, proc in running.items() if proc.poll() is not None]:
                    add_wall(args.runs / n, time.time() - start)
                    del running[n]
                time.sleep(1)
        finally:
            for n, proc in running.items():
                proc.wait()  # the run saves last.ckpt on Ctrl-C and exits
                add_wall(args.runs / n, time.time() - start)
        failed = [n for n, proc in procs.items() if proc.returncode]
        if failed:
            sys.exit(f"training {', '.join(failed)} failed; see the messages above or "
                     f"{args.runs}/<recipe>/train.log")


def add_wall(run_dir: Path, seconds: float) -> None:
    path = run_dir / WALL_FILE
    total = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    path.write_text(json.dumps({"seconds": total + seconds}))


def evaluate(run_dir: Path, data: Path, flip: bool = False) -> dict:
    """`vistra eval` of the run's best checkpoint on the test images (with `flip`, as the mean
    of each image's and its mirror image's prediction: --tta-flip)."""
    proc = vistra("eval", str(run_dir / "best.safetensors"), "--data", str(data / "test"),
                  "--json", *(["--tta-flip"] if flip else []), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate()
    if proc.returncode:
        sys.exit(f"vistra eval of {run_dir} failed (exit code {proc.returncode})")
    report = json.loads(out)
    name = "test_eval_tta_flip.json" if flip else "test_eval.json"
    (run_dir / name).write_text(json.dumps(report, indent=2))
    return report


def result_row(name: str, args: argparse.Namespace) -> dict:
    run_dir = args.runs / name
    history = read_metrics(run_dir)
    best = max(history, key=lambda r: max(r["val_top1"], r.get("ema_val_top1", 0.0)))
    model = load_checkpoint(run_dir / "best.safetensors")  # the model as trained
    shutil.copyfile(run_dir / CURVES_FILE, args.out / f"fashion_mnist_{name}_curves.png")
    wall = json.loads((run_dir / WALL_FILE).read_text())["seconds"]
    test = evaluate(run_dir, args.data)
    test_flip = evaluate(run_dir, args.data, flip=True)
    images = sum(map(sum, test["confusion"]))
    return {"recipe": name, "model": model.name,
            "params": sum(p.numel() for p in model.parameters()),
            "macs": count_macs(model, model.data_config.img_size, model.arch.in_chans),
            "epochs": history[-1]["epoch"], "wall_min": wall / 60,
            "val": max(best["val_top1"], best.get("ema_val_top1", 0.0)),
            "best_epoch": best["epoch"], "test": test["top1"], "test_flip": test_flip["top1"],
            "test_images": images}


def write_table(rows: list[dict], args: argparse.Namespace) -> Path:
    threads = args.threads or (1 if args.parallel else torch.get_num_threads())
    mode = "both at once" if args.parallel else "one after the other"
    command = f"python benchmarks/fashion_mnist.py{' --parallel' if args.parallel else ''}"
    lines = [
        "# Fashion-MNIST from scratch on a CPU",
        "",
        f"Produced by `{command}` on {date.today()}: {cpu_name()}, {os.cpu_count()} cores, "
        f"{threads} torch thread(s) per run, runs {mode}, torch {torch.__version__}.",
        "",
        f"Test top-1: what `vistra eval RUN/best.safetensors --data DATA/test` prints for the "
        f"{rows[0]['test_images']:,} test images, which training never saw: the checkpoint was "
        "chosen on validation images held out of the training set (the recipe's val_fraction). "
        "Train wall minutes: the whole `vistra train` command (folder scan, epochs, "
        "validation, checkpoints). Epochs: as many as the recipe's `time_budget` let the run "
        "fit on this machine that day (the speed of these shared cores drifts). "
        "With flip TTA: the same command with `--tta-flip`, each "
        "image's prediction the mean of its own and its mirror image's (the recipes train with "
        "horizontal flips; twice the inference compute, training unchanged).",
        "",
        "| recipe | model | params | MACs | epochs | train wall min | best val top-1 (epoch) "
        "| test top-1 | test top-1, flip TTA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| recipes/fashion_mnist_{r['recipe']}.yaml | {r['model']} | "
            f"{r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {r['epochs']} | "
            f"{r['wall_min']:.1f} | {100 * r['val']:.2f}% ({r['best_epoch']}) | "
            f"**{100 * r['test']:.2f}%** | **{100 * r['test_flip']:.2f}%** |")
    lines += ["", "Training curves: " + ", ".join(
        f"[{r['recipe']}](fashion_mnist_{r['recipe']}_curves.png)" for r in rows), ""]
    path = args.out / "fashion_mnist_results.md"
    path.write_text("\n".join(lines))
    return path


def cpu_name() -> str:
    return probe().cpu_model or platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    recipes = {n: yaml.safe_load(RECIPES[n].read_text()) for n in args.recipes}
    ensure_data(args.data, args.source)
    args.runs.mkdir(parents=True, exist_ok=True)
    train_all(args.recipes, args, recipes)
    rows = [result_row(n, args) for n in args.recipes]
    path = write_table(rows, args)
    print(path.read_text())


if __name__ == "__main__":
    main()
