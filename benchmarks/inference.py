"""Inference on this CPU, like for like: each path of vistra against the same path of
HuggingFace transformers, for ViT-S/16, ViT-B/16 and Swin-T at batch 1 and 16 on 2 threads.
The paths: eager fp32 (vistra: `vistra.optimize(model)`, as `vistra predict` runs it); bf16,
each library on the faster of its model cast to bf16 (vistra: `vistra.optimize(model,
torch.bfloat16)`) and bf16 autocast, both measured; ONNX fp32 (each library's model through
the TorchScript exporter); ONNX int8, each library's own export quantised alike (onnxruntime
dynamic quantisation, int8 per-channel 7-bit weights, as `vistra export --int8`). Then each
library's fastest path against the other's, both named. Also folder prediction of JPEG photos
against the model-only rate, and the int8 top-1 check on Fashion-MNIST. Prints the tables and
writes benchmarks/inference.md, with every figure in benchmarks/inference.json.

    python benchmarks/inference.py \\
        --fm-checkpoints runs/fm_vit/best.safetensors runs/fm_swin/best.safetensors \\
        --fm-test data/fashion_mnist/test
    python benchmarks/inference.py --tiny     # a check that the script runs (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

import vistra
from vistra import create_model
from vistra.accel.capabilities import cpu_has_bf16, cpu_info
from vistra.analysis.peers import hf_peer
from vistra.evaluate import evaluate_checkpoint
from vistra.onnx import export_checkpoint, export_onnx_bytes, quantize_int8, write_new
from vistra.predict import predict_images
from vistra.runtime import load_classifier
from vistra.weights import save_checkpoint

HERE = Path(__file__).parent
MODELS = {"vit_small_patch16_224": "ViT-S/16", "vit_base_patch16_224": "ViT-B/16",
          "swin_tiny_patch4_window7_224": "Swin-T"}
TINY = {"vit_small_patch16_224": dict(depth=1), "vit_base_patch16_224": dict(depth=1),
        "swin_tiny_patch4_window7_224": dict(depths=(2, 2, 2, 2), embed_dim=48)}
THREADS = 2
LIBRARIES = ("vistra", "HF")
CAST, AUTOCAST = "bf16 cast", "bf16 autocast"
PATHS = ("eager fp32", CAST, AUTOCAST, "ONNX fp32", "ONNX int8")
LIKE_FOR_LIKE = ("eager fp32", "bf16", "ONNX fp32", "ONNX int8")  # bf16: the faster of the two
BASELINE = ("vistra", "eager fp32")  # what `vistra predict` runs in fp32
# vistra.onnx.quantize_int8's settings (`vistra export --int8`), for HF's own export: int8
# weights per output channel in 7 bits (reduce_range), activations quantised per batch
DYNAMIC_INT8 = {"per_channel": True, "reduce_range": True}


def cpu_description() -> tuple[str, str]:
    """The CPU's model name and the flags that matter for these paths."""
    name, flags = cpu_info()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
              "avx_vnni")
    return (name or platform.processor() or "unknown",
            " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted))


def rate(fn: Callable[[], object], batch: int, seconds: float, rounds: int) -> float:
    """Images per second: the median over `rounds` of runs lasting about `seconds` each."""
    fn()
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4 or calls < 2:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    n = max(2, int(seconds / per_call))
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        results.append(n * batch / (time.perf_counter() - start))
    return statistics.median(results)


def session(graph: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def hf_onnx(module: torch.nn.Module, size: int) -> bytes | str:
    """transformers' model through torch.onnx (TorchScript exporter, dynamic batch), or the
    reason it failed."""
    import io
    import warnings

    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (torch.randn(1, 3, size, size),), buffer,
                              dynamo=False, opset_version=17, input_names=["image"],
                              output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as err:  # noqa: BLE001 - report any exporter failure as a table cell
        return f"export failed: {type(err).__name__}"
    return buffer.getvalue()


def hf_int8(exported: bytes, tmp: Path, name: str) -> str:
    """HuggingFace's own ONNX export, quantised as vistra's (DYNAMIC_INT8): the file's path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = tmp / f"hf_{name}.onnx", tmp / f"hf_{name}.int8.onnx"
    fp32.write_bytes(exported)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, **DYNAMIC_INT8)
    return str(int8)


def torch_paths(model: torch.nn.Module, optimized: Callable[[torch.nn.Module, torch.dtype],
                torch.nn.Module]) -> dict[str, Callable | str]:
    """One library's eager paths: fp32, cast to bf16 and bf16 autocast; `optimized(copy,
    dtype)` is how that library makes its model ready (vistra: vistra.optimize)."""
    def run(dtype: torch.dtype, autocast: bool) -> Callable:
        ready = optimized(copy.deepcopy(model), dtype)

        @torch.inference_mode()
        def step(x: torch.Tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return ready(x.to(dtype))
        return step

    paths: dict[str, Callable | str] = {"eager fp32": run(torch.float32, False)}
    for path, dtype, autocast in ((CAST, torch.bfloat16, False), (AUTOCAST, torch.float32, True)):
        paths[path] = run(dtype, autocast) if cpu_has_bf16() else "no bf16 arithmetic on this CPU"
    return paths


def onnx_paths(graph: bytes | str, int8: str | Path | None) -> dict[str, Callable | str]:
    """ONNX fp32 and int8 through onnxruntime; a string where export failed."""
    if isinstance(graph, str):
        return {"ONNX fp32": graph, "ONNX int8": graph}
    paths: dict[str, Callable | str] = {}
    for label, file in (("ONNX fp32", graph), ("ONNX int8", int8)):
        s = session(file if isinstance(file, bytes) else str(file))
        name_in = s.get_inputs()[0].name
        paths[label] = lambda x, s=s, n=name_in: s.run(None, {n: x.numpy()})
    return paths


def model_paths(name: str, overrides: dict, tmp: Path) -> dict[tuple[str, str], Callable | str]:
    """(library, path) -> a function taking an fp32 batch, for one architecture."""
    model = create_model(name, **overrides).eval()
    model.classes = None
    found = {("vistra", p): fn for p, fn in
             torch_paths(model, lambda m, dtype: vistra.optimize(m, dtype)).items()}
    graph, _ = export_onnx_bytes(model)  # the plain model, as `vistra export` exports it
    fp32_file = write_new(tmp / f"{name}.onnx", graph, force=True)
    int8_file = quantize_int8(fp32_file, tmp / f"{name}.int8.onnx", force=True)
    found.update({("vistra", p): fn for p, fn in onnx_paths(graph, int8_file).items()})
    peer = hf_tiny(name, overrides) if overrides else hf_peer(name).eval()
    found.update({("HF", p): fn for p, fn in
                  torch_paths(peer, lambda m, dtype: m.to(dtype).eval()).items()})
    exported = hf_onnx(peer, model.data_config.img_size[0])
    int8 = None if isinstance(exported, str) else hf_int8(exported, tmp, name)
    found.update({("HF", p): fn for p, fn in onnx_paths(exported, int8).items()})
    return found


def hf_tiny(name: str, overrides: dict) -> torch.nn.Module:
    """A transformers peer with the tiny setting's depth (for --tiny only)."""
    import transformers

    from vistra.analysis.peers import HFClassifier

    config = hf_peer(name).model.config
    if "depth" in overrides:
        config.num_hidden_layers = overrides["depth"]
    else:
        config.depths, config.embed_dim = list(overrides["depths"]), overrides["embed_dim"]
        config.num_layers = len(config.depths)
        config.hidden_size = overrides["embed_dim"] * 2 ** (len(config.depths) - 1)
    cls = (transformers.SwinForImageClassification if "swin" in name
           else transformers.ViTForImageClassification)
    return HFClassifier(cls(config)).eval()


def best_bf16(rates: dict[tuple[str, str], float | str], library: str) -> str:
    """A library's faster bf16 path (CAST or AUTOCAST), or CAST where neither was measured
    (its rate is then the reason)."""
    measured = {p: rates[library, p] for p in (CAST, AUTOCAST)
                if not isinstance(rates[library, p], str)}
    return max(measured, key=measured.__getitem__) if measured else CAST


def like_for_like(short: str, batch: int, rates: dict) -> list[str]:
    """One row per path, vistra against HF on the same path (bf16: each on its faster one,
    named), then each library's fastest path against the other's, both named."""
    rows = []
    for path in LIKE_FOR_LIKE:
        chosen = {lib: best_bf16(rates, lib) if path == "bf16" else path for lib in LIBRARIES}
        a, b = (rates[lib, chosen[lib]] for lib in LIBRARIES)
        label = path
        if path == "bf16" and not isinstance(a, str):
            label = (f"bf16 (vistra {chosen['vistra'].removeprefix('bf16 ')}, "
                     f"HF {chosen['HF'].removeprefix('bf16 ')})")
        ratio = "" if isinstance(a, str) or isinstance(b, str) else f"**{a / b:.2f}x**"
        rows.append(f"| {short} | {batch} | {label} | {cell(a)} | {cell(b)} | {ratio} |")
    best = {}
    for lib in LIBRARIES:
        measured = {p: v for (owner, p), v in rates.items()
                    if owner == lib and not isinstance(v, str)}
        best[lib] = max(measured.items(), key=lambda kv: kv[1])
    (pa, a), (pb, b) = best["vistra"], best["HF"]
    rows.append(f"| {short} | {batch} | fastest against fastest: vistra {pa} vs HF {pb} | "
                f"{a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return rows


def cell(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.1f}"


def model_table(args, tmp: Path) -> tuple[list[str], list[str], list[dict]]:
    """The like-for-like table, every path measured (raw), and the figures as records."""
    pairs = ["| model | batch | path | vistra img/s | HF img/s | vistra / HF |",
             "|---|---|---|---|---|---|"]
    raw = ["| model | batch | library | path | images/s | vs vistra eager fp32 |",
           "|---|---|---|---|---|---|"]
    records: list[dict] = []
    for name, short in MODELS.items():
        if args.models and name not in args.models:
            continue
        paths = model_paths(name, TINY[name] if args.tiny else {}, tmp)
        for batch in (1, 16):
            x = torch.randn(batch, 3, 224, 224)
            rates = {key: (fn if isinstance(fn, str) else
                           rate(lambda fn=fn, x=x: fn(x), batch, args.seconds, args.rounds))
                     for key, fn in paths.items()}
            base = rates[BASELINE]
            for (library, path), value in rates.items():
                records.append({"model": short, "batch": batch, "library": library,
                                "path": path, "images_per_s": value})
                versus = "" if isinstance(value, str) else f"{value / base:.2f}x"
                raw.append(f"| {short} | {batch} | {library} | {path} | {cell(value)} | "
                           f"{versus} |")
            pairs += like_for_like(short, batch, rates)
            print("\n".join(pairs[-len(LIKE_FOR_LIKE) - 1:]), flush=True)  # with fastest
    return pairs, raw, records


def make_photos(folder: Path, count: int) -> list[Path]:
    """`count` 1600x1200 JPEGs cut from scikit-image's sample photos (scaled, shifted,
    mirrored), so decoding meets real photographic content."""
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.immunohistochemistry(), data.retina()]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = Image.fromarray(sources[i % len(sources)]).convert("RGB")
        scale = rng.uniform(1.1, 1.4)
        w, h = 1600, 1200
        big = photo.resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
        left, top = rng.integers(0, big.width - w + 1), rng.integers(0, big.height - h + 1)
        image = big.crop((left, top, left + w, top + h))
        if i % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        paths.append(folder / f"photo{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def folder_table(args, tmp: Path) -> list[str]:
    """End-to-end folder prediction (decode in threads + draft mode + model) against the
    same classifier's model-only rate at the same batch."""
    name = args.predict_model
    model = create_model(name, **(TINY[name] if args.tiny else {})).eval()
    checkpoint = tmp / "predict.safetensors"
    save_checkpoint(model, checkpoint, classes=[f"c{i}" for i in range(model.num_classes)])
    photos = make_photos(tmp / "photos", args.photos)
    lines = ["| model | path | batch | model only, images/s | folder, images/s | ratio |",
             "|---|---|---|---|---|---|"]
    for backend, dtype in (("torch", "auto"), ("onnx", "fp32")):
        classifier = load_classifier(checkpoint, backend=backend, dtype=dtype)
        x = torch.randn(args.batch, 3, 224, 224)
        model_only = rate(lambda c=classifier, x=x: c(x), args.batch, args.seconds, args.rounds)
        predict_images(classifier, photos[: args.batch], batch_size=args.batch)  # warm-up
        start = time.perf_counter()
        predictions, _ = predict_images(classifier, photos, batch_size=args.batch,
                                        workers=args.workers)
        folder = len(predictions) / (time.perf_counter() - start)
        lines.append(f"| {MODELS.get(name, name)} | {backend} {classifier.dtype} | "
                     f"{args.batch} | {model_only:.1f} | {folder:.1f} | "
                     f"{folder / model_only:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def fm_table(args, tmp: Path) -> list[str]:
    """Each recipe checkpoint: ONNX fp32 vs int8 top-1 on the test set, file sizes, and the
    batch-1 speed of int8 against eager fp32."""
    lines = ["| checkpoint | top-1 fp32 | top-1 int8 | points lost | int8 size | "
             "eager fp32 b1 img/s | int8 b1 img/s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for checkpoint in args.fm_checkpoints:
        fp32 = tmp / f"{Path(checkpoint).parent.name}.onnx"
        export_checkpoint(checkpoint, fp32, force=True)
        int8 = quantize_int8(fp32, fp32.with_suffix(".int8.onnx"), force=True)
        top1 = [evaluate_checkpoint(f, args.fm_test, workers=1)[0].totals.top1
                for f in (fp32, int8)]
        eager, quant = (load_classifier(checkpoint, dtype="fp32"), load_classifier(int8))
        x = torch.randn(1, eager.in_chans, *eager.data_config.img_size)
        speeds = [rate(lambda c=c, x=x: c(x), 1, args.seconds, args.rounds)
                  for c in (eager, quant)]
        size = int8.stat().st_size / fp32.stat().st_size
        lines.append(f"| {checkpoint} | {100 * top1[0]:.2f}% | {100 * top1[1]:.2f}% | "
                     f"{100 * (top1[0] - top1[1]):.2f} | {100 * size:.0f}% of fp32 | "
                     f"{speeds[0]:.1f} | {speeds[1]:.1f} | {speeds[1] / speeds[0]:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all three")
    parser.add_argument("--photos", type=int, default=2000, help="JPEGs for folder prediction")
    parser.add_argument("--predict-model", default="vit_base_patch16_224",
                        choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=16, help="folder prediction batch")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--fm-checkpoints", nargs="*", default=[], metavar="CKPT")
    parser.add_argument("--fm-test", metavar="DIR", help="Fashion-MNIST test folder")
    parser.add_argument("--seconds", type=float, default=3.0, help="per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true",
                        help="depth-reduced models, 8 photos, short timings: checks the script")
    parser.add_argument("--out", type=Path,
                        help="default: benchmarks/inference.md (with --tiny: a temporary file)")
    args = parser.parse_args()
    args.out = args.out or HERE / "inference.md"
    if args.tiny:
        args.photos, args.seconds, args.rounds = 8, 0.2, 1
        args.out = args.out if "--out" in sys.argv else Path(tempfile.gettempdir()) / (
            "vistra_inference_tiny.md")
    if args.fm_checkpoints and not args.fm_test:
        parser.error("--fm-checkpoints needs --fm-test")
    torch.set_num_threads(THREADS)
    cpu, flags = cpu_description()
    print(f"CPU: {cpu}; flags: {flags}; torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, {THREADS} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pairs, raw, records = model_table(args, tmp)
        folder = folder_table(args, tmp)
        fm = (fm_table(args, tmp) if args.fm_checkpoints else
              ["not regenerated: pass --fm-checkpoints CKPT ... --fm-test DIR"])
    command = " ".join(["python", "benchmarks/inference.py", *sys.argv[1:]])
    text = "\n".join([
        "# Inference: vistra against HuggingFace path by path; folder prediction", "",
        f"Measured {datetime.date.today()} with `{command}`.", "",
        f"CPU: {cpu}. Flags: {flags}. torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, {THREADS} threads (torch and onnxruntime intra-op).", "",
        "Random weights (speed does not depend on them). Images/s is the median of "
        f"{args.rounds} rounds of about {args.seconds:g} s after warm-up. Each path of "
        "vistra against the same path of HuggingFace transformers: eager fp32 (vistra: "
        "`vistra.optimize(model)`, as `vistra predict` runs it); bf16, each library on the "
        "faster of its model cast to bf16 once (vistra: `vistra.optimize(model, "
        "torch.bfloat16)`, as `vistra predict --dtype bf16` runs it) and bf16 autocast, the "
        "one taken named in the row, both in the raw table; ONNX fp32, each library's model "
        "through the same TorchScript exporter (vistra's as `vistra export` writes it, "
        "HF's at a fixed image size); ONNX int8, each library's own export through "
        "onnxruntime dynamic quantisation with the same settings (`vistra export --int8`: "
        "int8 weights per output channel in 7 bits, activations per batch). The last row of "
        "each model and batch sets each library's fastest path against the other's, both "
        "named. Every figure: inference.json beside this file.", "",
        "## Like for like", "", *pairs, "",
        "## Every path measured", "", *raw, "",
        f"## Folder prediction ({args.photos} JPEGs of 1600x1200 from scikit-image samples)",
        "", "Decoding runs in threads beside the model, large JPEGs in draft mode. Target: "
        "folder >= 0.85x the model-only rate.", "", *folder, "",
        "## int8 on the Fashion-MNIST test set", "",
        "Targets: int8 >= 1.8x eager fp32 at batch 1, <= 0.5 points top-1 lost, file <= 30% "
        "of fp32.", "", *fm, ""])
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "cpu": cpu, "flags": flags, "threads": THREADS,
         "rounds": args.rounds, "seconds": args.seconds, "rates": records}, indent=1) + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
