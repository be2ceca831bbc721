"""Before and after a change to vistra's structure, side by side on one CPU: the same cases
timed in two source trees, in worker processes that alternate (before, after, before, ...),
with HuggingFace transformers timed in every worker as the yardstick that both share.

Cases: fp32 and bf16 inference of ViT-B/16 and Swin-T at batch 1 and 16, each as
`create_model(...).eval()` alone ("plain"), as `vistra predict` runs it ("predict": the tree's
fast paths; bf16 with the model cast once) and HuggingFace's same model (fp32; bf16 autocast
and cast, the faster kept); a bf16 autocast training step of ViT-S/16 and Swin-T at batch 16
(vistra as `vistra train` runs it, and HF); ONNX export: parity error against eager PyTorch
and onnxruntime images/s at batch 1. Then the models package of each tree in one process
(the before tree's loaded under another name, the same weights, interleaved calls), which
no load on the machine can tilt: the predict path's milliseconds, before against after.
Writes benchmarks/architecture.md and the raw figures to benchmarks/architecture.json.

    git worktree add /tmp/before <commit>
    python benchmarks/architecture.py --before /tmp/before --rounds 3
    python benchmarks/architecture.py --before /tmp/before --tiny   # a check that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
MODELS = {"vit_base_patch16_224": "ViT-B/16", "swin_tiny_patch4_window7_224": "Swin-T"}
TRAIN_MODELS = {"vit_small_patch16_224": "ViT-S/16", "swin_tiny_patch4_window7_224": "Swin-T"}
TINY = {"vit_base_patch16_224": dict(depth=1), "vit_small_patch16_224": dict(depth=1),
        "swin_tiny_patch4_window7_224": dict(depths=(2, 2, 2, 2), embed_dim=48)}


def worker(tiny: bool, seconds: float) -> dict:
    """Every case in this process's vistra; {case: images per second or a figure}."""
    import copy
    import time

    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    import vistra
    from vistra.analysis.peers import hf_peer

    torch.set_num_threads(2)
    new = hasattr(vistra, "optimize")
    if new:
        from vistra.accel import accelerate_training
        from vistra.onnx import export_onnx_bytes

        def predict_model(model, dtype):
            return vistra.optimize(model, dtype)
    else:
        from vistra.export import export_onnx_bytes
        from vistra.models.bf16 import to_bf16_inference

        def accelerate_training(model):
            return model

        def predict_model(model, dtype):
            return to_bf16_inference(model) if dtype == torch.bfloat16 else model.eval()

    def rate(fn, batch: int) -> float:
        fn()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < seconds or calls < 2:
            fn()
            calls += 1
        return calls * batch / (time.perf_counter() - start)

    def build(name):
        torch.manual_seed(0)
        return vistra.create_model(name, **(TINY[name] if tiny else {})).eval()

    def peer(name):
        if tiny:
            from transformers import (
                SwinConfig,
                SwinForImageClassification,
                ViTConfig,
                ViTForImageClassification,
            )

            from vistra.analysis.peers import HFClassifier
            if name.startswith("swin"):
                cfg = SwinConfig(embed_dim=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24],
                                 num_labels=1000)
                return HFClassifier(SwinForImageClassification(cfg)).eval()
            width = 768 if "base" in name else 384
            cfg = ViTConfig(hidden_size=width, num_hidden_layers=1, num_attention_heads=12 if
                            width == 768 else 6, intermediate_size=4 * width, num_labels=1000)
            return HFClassifier(ViTForImageClassification(cfg)).eval()
        return hf_peer(name).eval()

    out: dict[str, float] = {}
    for name in MODELS:
        plain, hf = build(name), peer(name)
        fast32 = predict_model(copy.deepcopy(plain), torch.float32)
        fast16 = predict_model(copy.deepcopy(plain), torch.bfloat16)
        hf16 = copy.deepcopy(hf).bfloat16()
        for batch in (1, 16):
            x = torch.randn(batch, 3, 224, 224)
            xb = x.bfloat16()

            def run(model, inp, autocast=False):
                def call():
                    with torch.inference_mode(), torch.autocast(
                            "cpu", dtype=torch.bfloat16, enabled=autocast):
                        model(inp)
                return call
            cases = {
                "fp32 plain": run(plain, x), "fp32 predict": run(fast32, x),
                "fp32 HF": run(hf, x),
                "bf16 plain (autocast)": run(plain, x, True), "bf16 predict": run(fast16, xb),
                "bf16 HF autocast": run(hf, x, True), "bf16 HF cast": run(hf16, xb),
            }
            for case, fn in cases.items():
                out[f"{name} b{batch} {case}"] = rate(fn, batch)
        graph, result = export_onnx_bytes(copy.deepcopy(plain))
        out[f"{name} onnx max error"] = result.max_error
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        image = torch.randn(1, 3, 224, 224).numpy()
        out[f"{name} onnx b1"] = rate(lambda s=session, i=image: s.run(None, {"image": i}), 1)
        del plain, hf, fast32, fast16, hf16
    for name in TRAIN_MODELS:
        x, labels = torch.randn(16, 3, 224, 224), torch.randint(0, 10, (16,))
        for impl, model in (("vistra", accelerate_training(build(name))), ("HF", peer(name))):
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step(model=model, optimizer=optimizer, x=x, labels=labels):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out[f"{name} train bf16 b16 {impl}"] = rate(step, 16)
    return out


def same_process(before: Path, tiny: bool, rounds: int) -> dict:
    """{case: (before ms, after ms)}: the before tree's models package (self-contained: it
    imports only itself) loaded as `before_models` beside this tree's vistra, the same weights
    in both, the predict path of each timed in alternation."""
    import copy
    import importlib.util
    import time

    import torch

    import vistra

    spec = importlib.util.spec_from_file_location(
        "before_models", before / "src/vistra/models/__init__.py",
        submodule_search_locations=[str(before / "src/vistra/models")])
    old_models = importlib.util.module_from_spec(spec)
    sys.modules["before_models"] = old_models
    spec.loader.exec_module(old_models)
    old_bf16 = importlib.import_module("before_models.bf16")
    torch.set_num_threads(2)
    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        new = vistra.create_model(name, **(TINY[name] if tiny else {})).eval()
        old = old_models.build_model(name, **(TINY[name] if tiny else {})).eval()
        old.load_state_dict(new.state_dict())
        for dtype in ("fp32", "bf16"):
            if dtype == "bf16":
                paths = (old_bf16.to_bf16_inference(copy.deepcopy(old)),
                         vistra.optimize(copy.deepcopy(new), torch.bfloat16))
            else:
                paths = (old, vistra.optimize(copy.deepcopy(new)))
            for batch in (1, 16):
                x = torch.randn(batch, 3, 224, 224, dtype=next(paths[1].parameters()).dtype)
                times: tuple[list, list] = ([], [])
                with torch.inference_mode():
                    for model in paths * 2:
                        model(x)
                    for _ in range(rounds):
                        for model, kept in zip(paths, times, strict=True):
                            start = time.perf_counter()
                            model(x)
                            kept.append(time.perf_counter() - start)
                out[f"{name} b{batch} {dtype} predict"] = tuple(
                    statistics.median(t) * 1e3 for t in times)
    return out


def run_worker(tree: Path, tiny: bool, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    args = [sys.executable, __file__, "--worker", "--seconds", str(seconds)]
    if tiny:
        args.append("--tiny")
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu() -> str:
    # This checkout's probe, imported here: the workers import vistra from their own trees.
    from vistra.accel import probe

    found = probe()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    flags = " ".join(f for f in wanted if f in found.flags) or "none of " + str(wanted)
    return f"{found.cpu_model or 'unknown CPU'}; flags: {flags}"


def hf_ratio(run: dict, case: str) -> float | None:
    """A vistra case over the fastest HF path of the same model, batch and dtype in the same
    worker: the machine's load of the moment divides out."""
    if "HF" in case or "error" in case or "onnx" in case:
        return None
    head = case.rsplit(" ", 1)[0] if "train" in case else " ".join(case.split()[:3])
    peers = [v for k, v in run.items() if k.startswith(head) and "HF" in k]
    return run[case] / max(peers) if peers else None


def table(runs: dict[str, list[dict]]) -> list[str]:
    rows = ["| case | before | after | after / before | before vs HF | after vs HF |",
            "|---|---:|---:|---:|---:|---:|"]
    for case in runs["after"][0]:
        b, a = (statistics.median(run[case] for run in runs[label])
                for label in ("before", "after"))
        if "error" in case:
            rows.append(f"| {case} | {b:.1e} | {a:.1e} | | | |")
            continue
        vs = []
        for label in ("before", "after"):
            ratios = [r for r in (hf_ratio(run, case) for run in runs[label]) if r is not None]
            vs.append(f"{statistics.median(ratios):.2f}x" if ratios else "")
        rows.append(f"| {case} | {b:.2f} | {a:.2f} | {a / b:.2f}x | {vs[0]} | {vs[1]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="root of the tree before the change")
    parser.add_argument("--after", type=Path, default=HERE.parent, help="default: this tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="per case and worker")
    parser.add_argument("--tiny", action="store_true", help="small models, no file written")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "architecture.md")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.tiny, args.seconds)))
        return
    if args.before is None:
        parser.error("--before: the root of the tree to compare with")
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for label, tree in (("before", args.before), ("after", args.after)):
            runs[label].append(run_worker(tree.resolve(), args.tiny, args.seconds))
            print(f"round {r + 1}/{args.rounds}: {label} done", file=sys.stderr, flush=True)
    paired = same_process(args.before.resolve(), args.tiny, 4 if args.tiny else 12)
    lines = [f"# Before and after: {args.before.name} -> {args.after.resolve().name}", "",
             f"`python benchmarks/architecture.py --rounds {args.rounds}` on "
             f"{datetime.date.today()}, 2 threads. CPU: {cpu()}.", "",
             "## The models package in one process", "",
             "Milliseconds per batch of the predict path (fp32: the tree's fast paths; bf16: "
             "the model cast once), the before tree's models package and this tree's "
             "`vistra.optimize`, same weights, calls interleaved, medians:", "",
             "| case | before ms | after ms | after / before (time) |", "|---|---:|---:|---:|",
             *(f"| {case} | {b:.1f} | {a:.1f} | {a / b:.3f} |"
               for case, (b, a) in paired.items()), "",
             "## Whole trees against HuggingFace", "",
             "Images per second (training: images per second of bf16 autocast steps with "
             "fused AdamW), medians over rounds of worker processes that alternate between "
             "the two trees. \"plain\": `create_model(...).eval()` alone; \"predict\": what "
             "`vistra predict` runs (bf16: the model cast once); HF: transformers' same "
             "model, fp32, bf16 under autocast and cast to bf16. \"vs HF\" divides, in each "
             "worker, by the fastest HF path of the same model, batch and dtype (fp32 cases: "
             "fp32 HF), then takes the median: the machine's load at the moment divides out, "
             "which the images/s columns keep.", "", *table(runs)]
    print("\n".join(lines))
    if not args.tiny:
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "paired": paired},
                                                            indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
