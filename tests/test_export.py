"""ONNX export: onnxruntime gives eager PyTorch's logits for every family, at any batch and
at a second image size from the same file (or the file refuses the size); the metadata
carries what prediction needs, and the explain method measured for the model; int8, dynamic
or static from calibration images, keeps the fp32 model's answers and the metadata."""

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

import vistra
from vistra import create_model
from vistra.cli import main
from vistra.data import find_images, load_rgb
from vistra.fileio import file_sha256
from vistra.models import ExplainChoice, get_family
from vistra.onnx import (
    calibration_images,
    export_checkpoint,
    export_onnx_bytes,
    foreign_ops,
    quantize_int8,
    quantize_int8_static,
    read_onnx_metadata,
    size_rule,
)
from vistra.predict import predict_images
from vistra.runtime import load_classifier, module_classifier
from vistra.weights import save_checkpoint, save_explain_choice

MINI = Path(vistra.__file__).parent / "assets" / "fashion_mnist_mini"
FMNIST_CLASSES = sorted(p.name for p in (MINI / "test").iterdir())

# (name, overrides, a second image size): depth-reduced variants keep every family's code
# path (hybrid stem, distillation token, window 12, conv stems) at a fraction of the time.
SMALL = {
    "vit_b16_224": ("vit_base_patch16_224", dict(depth=1), (256, 288)),
    "vit_b16_384": ("vit_base_patch16_384", dict(depth=1), (352, 416)),
    "deit_distilled": ("deit_small_distilled_patch16_224", dict(depth=1), (192, 256)),
    "r50_hybrid": ("vit_base_r50_s16_224", dict(depth=1, hybrid_depths=(1, 1, 1)), (256, 256)),
    "swin_t_224": ("swin_tiny_patch4_window7_224", dict(depths=(2, 2, 2, 1)), (250, 301)),
    "swin_b_w12_384": ("swin_base_patch4_window12_384",
                       dict(depths=(2, 1, 1, 1), embed_dim=32), (400, 416)),
    "vit_fmnist": ("vit_fmnist", {}, (36, 44)),
    "swin_fmnist": ("swin_fmnist", {}, (30, 45)),
}
FULL = {
    "vit_b16_224_full": ("vit_base_patch16_224", {}, (256, 288)),
    "swin_t_224_full": ("swin_tiny_patch4_window7_224", {}, (256, 320)),
}


def build(name: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = not name.startswith("swin")
    model = create_model(name, num_classes=5, **overrides, **({"dynamic_img_size": True}
                                                                 if vit else {})).eval()
    model.classes = list("abcde")
    return model


@pytest.fixture(scope="module")
def exported(request):
    """key -> (eager model, ONNX bytes, export result, session), each family exported once."""
    cache = {}

    def get(key: str):
        if key not in cache:
            name, overrides, _ = {**SMALL, **FULL}[key]
            model = build(name, overrides)
            graph, result = export_onnx_bytes(model, source_sha256="f" * 64)
            session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
            cache[key] = (model, graph, result, session)
        return cache[key]
    return get


def run_both(model, session, x: torch.Tensor):
    with torch.no_grad():
        eager = model(x).numpy()  # the eager path users run, fast paths included
    return session.run(None, {"image": x.numpy()})[0], eager


def check_family(exported, key: str) -> None:
    model, graph, result, session = exported(key)
    assert foreign_ops(onnx.load_from_string(graph)) == []
    h, w = model.data_config.img_size
    for batch in (1, 3):
        out, eager = run_both(model, session, torch.randn(batch, model.arch.in_chans, h, w))
        np.testing.assert_allclose(out, eager, atol=1e-4, rtol=0)
    # A second size from the same file: the right logits, or a refusal by the graph itself.
    second = {**SMALL, **FULL}[key][2]
    x = torch.randn(2, model.arch.in_chans, *second)
    if result.metadata.size_multiple == 0:
        with pytest.raises(Exception, match="(?i)invalid dimensions"):
            run_both(model, session, x)
    else:
        out, eager = run_both(model, session, x)
        np.testing.assert_allclose(out, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("key", list(SMALL))
def test_onnxruntime_matches_eager_for_every_family(exported, key):
    check_family(exported, key)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(FULL))
def test_onnxruntime_matches_eager_full_size(exported, key):
    check_family(exported, key)


def test_vit_and_swin_sizes_are_dynamic_and_recorded(exported):
    """ViT: multiples of the patch; Swin: any size whose shifted stages keep maps larger
    than the window (4 px patches x 4 (third stage) x window 7, plus one)."""
    assert read_meta(exported("vit_b16_224")).size_multiple == 16
    assert read_meta(exported("r50_hybrid")).size_multiple == 16  # SAME padding in the graph
    swin = read_meta(exported("swin_t_224"))
    assert (swin.size_multiple, swin.min_size) == (1, 4 * 4 * 7 + 1)
    assert size_rule(exported("swin_b_w12_384")[0]) == (1, 4 * 1 * 12 + 1)  # stage 1 shifts
    assert size_rule(exported("swin_fmnist")[0]) == (1, 4 * 4 + 1)


def test_a_family_without_a_size_rule_is_exported_at_its_own_size_only(monkeypatch):
    """The default for a family that declares no export sizes: the graph's height and width
    are fixed, so onnxruntime refuses other sizes instead of answering wrongly."""
    monkeypatch.setattr(get_family("vit"), "export_size_rule", None)
    graph, result = export_onnx_bytes(small_fmnist_vit())
    assert (result.metadata.size_multiple, result.metadata.min_size) == (0, 28)
    assert result.probe_size is None
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        session.run(None, {"image": torch.zeros(1, 1, 35, 35).numpy()})


def read_meta(entry):
    return entry[2].metadata


def test_swin_graph_computes_its_window_layout_for_the_input(exported):
    """The trap the size rule guards: a graph holding one size's gathers and mask would
    break at another; ours follows the input, even for a size never traced (odd, padded)."""
    model, _, _, session = exported("swin_fmnist")
    for size in ((17, 60), (92, 92)):
        out, eager = run_both(model, session, torch.randn(1, 1, *size))
        np.testing.assert_allclose(out, eager, atol=1e-4, rtol=0)


def test_onnx_classifier_refuses_unsupported_sizes(exported, tmp_path):
    _, graph, _, _ = exported("swin_fmnist")
    (tmp_path / "m.onnx").write_bytes(graph)
    classifier = load_classifier(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="at least 17"):
        classifier(torch.zeros(1, 1, 16, 40))
    _, graph, _, _ = exported("vit_b16_224")
    (tmp_path / "v.onnx").write_bytes(graph)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_classifier(tmp_path / "v.onnx")(torch.zeros(1, 3, 224, 230))


def small_fmnist_vit() -> torch.nn.Module:
    """A ViT for the bundled 28x28 grey-level Fashion-MNIST sample: 16 tokens of 64."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=28, in_chans=1, num_classes=10,
                         patch_size=7, embed_dim=64, depth=1, num_heads=4)
    model.data_config = replace(model.data_config, mean=(0.286,) * 3, std=(0.353,) * 3,
                                crop_pct=1.0)
    return model


@pytest.fixture(scope="module")
def fmnist_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fmnist") / "small.safetensors"
    save_checkpoint(small_fmnist_vit(), path, classes=FMNIST_CLASSES)
    return path


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """The small ViT trained for three epochs on the sample's 2,500 training images (about
    54% test top-1): int8 must keep the answers of a model with real, uneven margins."""
    model = small_fmnist_vit()
    transform = module_classifier(model).transform
    images = find_images([MINI / "train"])[0]
    x = torch.stack([transform(load_rgb(p)) for p in images])
    y = torch.tensor([FMNIST_CLASSES.index(p.parent.name) for p in images])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("fmnist") / "trained.safetensors"
    save_checkpoint(model.eval(), path, classes=FMNIST_CLASSES)
    return path


def test_export_cli_metadata_and_overwrite(fmnist_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(fmnist_checkpoint), "--out", str(out)]) == 0
    assert "image sizes: heights and widths >= 7, multiples of 7" in capsys.readouterr().out
    meta = read_onnx_metadata(out)
    source = load_classifier(fmnist_checkpoint, dtype="fp32")
    assert (meta.name, meta.classes, meta.data_config, meta.in_chans) == (
        source.name, source.classes, source.data_config, source.in_chans)
    assert meta.source_sha256 == file_sha256(fmnist_checkpoint)
    # no explain method was measured for it: the file records none, as before there were any
    assert meta.explain is None
    assert "vistra.explain" not in {p.key for p in onnx.load(out).metadata_props}
    before = out.read_bytes()
    assert main(["export", str(fmnist_checkpoint), "--out", str(out)]) == 2
    assert "exists; choose another --out or pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["export", str(fmnist_checkpoint), "--out", str(out), "--force"]) == 0


def test_the_measured_explain_method_travels_into_the_file_and_its_int8_copies(
        fmnist_checkpoint, tmp_path):
    """The card's ExplainChoice under vistra.explain, in the checkpoint's own serialisation;
    both kinds of int8 copy, which are new graphs, carry it over; a damaged record is
    refused naming the file."""
    scores = {m: {"deletion": d, "road": d, "insertion": 1 - d}
              for m, d in (("occlusion", 0.2), ("lrp", 0.3), ("random", 0.5))}
    choice = ExplainChoice("occlusion", scores, 8, "fmnist/val", 16, "vistra train")
    chosen = save_explain_choice(fmnist_checkpoint, choice, tmp_path / "chosen.safetensors")
    out = tmp_path / "model.onnx"
    assert main(["export", str(chosen), "--out", str(out), "--int8"]) == 0
    static = quantize_int8_static(out, tmp_path / "static.onnx", MINI / "train", images=8)
    with safe_open(str(chosen), framework="pt") as f:
        stored = f.metadata()["explain"]
    for path in (out, tmp_path / "model.int8.onnx", static):
        props = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert props["vistra.explain"] == stored, path
        assert read_onnx_metadata(path).explain == choice
        assert load_classifier(path).explain == choice
    model = onnx.load(out)
    next(p for p in model.metadata_props if p.key == "vistra.explain").value = '{"method": 3}'
    onnx.save(model, tmp_path / "damaged.onnx")
    with pytest.raises(ValueError, match="damaged.onnx has a damaged explain record"):
        read_onnx_metadata(tmp_path / "damaged.onnx")


def test_predict_onnx_prints_what_predict_safetensors_prints(fmnist_checkpoint, tmp_path,
                                                             capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(fmnist_checkpoint), "--out", str(out)]) == 0
    folder = str(MINI / "test" / "Bag")
    capsys.readouterr()
    outputs = []
    for args in ([str(out)], [str(fmnist_checkpoint), "--dtype", "fp32"],
                 [str(fmnist_checkpoint), "--backend", "onnx"]):
        assert main(["predict", *args, folder, "--topk", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].count("\n") == 50 and outputs[0] == outputs[1] == outputs[2]


@pytest.mark.slow
def test_int8_agrees_with_fp32_and_is_smaller(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(trained_checkpoint), "--out", str(out), "--int8",
                 "--data", str(MINI / "test")]) == 0
    printed = capsys.readouterr().out
    int8 = tmp_path / "model.int8.onnx"
    assert f"wrote {int8}" in printed and printed.count("top-1 on") == 2
    assert read_onnx_metadata(int8).quantization == "int8-dynamic-per-channel"
    assert int8.stat().st_size < 0.5 * out.stat().st_size
    assert top1_agreement(out, int8, MINI / "test") >= 0.99
    with pytest.raises(FileExistsError):
        quantize_int8(out, int8)


def top1_agreement(model: Path, other: Path, folder: Path) -> float:
    """The share of the folder's images on which the two files' top classes agree."""
    images, _ = find_images([folder])
    first, _ = predict_images(load_classifier(model), images, topk=1)
    second, _ = predict_images(load_classifier(other), images, topk=1)
    return float(np.mean([a.topk[0][0] == b.topk[0][0]
                          for a, b in zip(first, second, strict=True)]))


@pytest.mark.slow
def test_static_int8_agrees_with_fp32_and_is_smaller_than_dynamic(trained_checkpoint, tmp_path,
                                                                   capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(trained_checkpoint), "--out", str(out), "--int8",
                 "--calibrate", str(MINI / "train")]) == 0
    int8 = tmp_path / "model.int8.onnx"
    assert (f"wrote {int8}" in (printed := capsys.readouterr().out)
            and f"int8, static, calibrated on 200 images of {MINI / 'train'}" in printed)
    meta = read_onnx_metadata(int8)
    assert (meta.quantization, meta.calibration_images) == ("int8-static-qdq-per-channel", 200)
    assert meta.classes == read_onnx_metadata(out).classes
    # Every layer with weights (the patch embedding's Conv, the linear layers' MatMul, the
    # head's Gemm) computes on quantised inputs; attention's q.k and p.v stay float.
    graph = onnx.load(str(int8)).graph
    made_by = {name: node.op_type for node in graph.node for name in node.output}
    layers = [node for node in graph.node if node.op_type in ("Conv", "MatMul", "Gemm")]
    quantised = [node for node in layers
                 if all(made_by.get(name) == "DequantizeLinear" for name in node.input[:2])]
    assert {node.op_type for node in quantised} == {"Conv", "MatMul", "Gemm"}
    assert [node.op_type for node in layers if node not in quantised] == ["MatMul", "MatMul"]
    assert not foreign_ops(onnx.load(str(int8)))
    dynamic = quantize_int8(out, tmp_path / "dynamic.onnx")
    assert int8.stat().st_size < dynamic.stat().st_size
    classifier = load_classifier(int8)
    assert (classifier.backend, classifier.dtype) == ("onnx", "int8")
    assert classifier(torch.zeros(2, 1, 35, 42)).shape == (2, 10)  # other sizes, as fp32
    assert top1_agreement(out, int8, MINI / "test") >= 0.99


@pytest.mark.parametrize("name", ["vit_fmnist", "swin_fmnist"])
def test_the_presets_int8_files_are_at_most_30_percent_of_fp32_with_the_weights_named(
        name, tmp_path):
    """Graph names are a large share of a small model's int8 file: the intermediate tensors
    get short names, the weights keep theirs, and the file is still valid ONNX."""
    checkpoint = tmp_path / f"{name}.safetensors"
    save_checkpoint(create_model(name), checkpoint, classes=FMNIST_CLASSES)
    out = export_checkpoint(checkpoint, tmp_path / f"{name}.onnx").path
    fp32 = onnx.load(str(out))
    for int8 in (quantize_int8_static(out, tmp_path / "static.onnx", MINI / "train", images=16),
                 quantize_int8(out, tmp_path / "dynamic.onnx")):
        proto = onnx.load(str(int8))
        onnx.checker.check_model(proto)
        outputs = [t for node in proto.graph.node for t in node.output if t != "logits"]
        assert all(re.fullmatch(r"t\d+", name) for name in outputs)
        assert not any(node.name for node in proto.graph.node)
        kept = [t.name for t in proto.graph.initializer]
        assert all(any(name.startswith(t.name) for name in kept)
                   for t in fp32.graph.initializer if t.name.endswith(".weight"))
    static = (tmp_path / "static.onnx").stat().st_size
    assert static <= 0.30 * out.stat().st_size


def test_static_int8_needs_int8_and_a_calibration_folder_with_images(fmnist_checkpoint,
                                                                      tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "model.onnx"
    export = ["export", str(fmnist_checkpoint), "--out", str(out)]
    for args, message in [
            (["--int8", "--calibrate", str(tmp_path / "missing")],
             f"calibration folder {tmp_path / 'missing'} does not exist"),
            (["--int8", "--calibrate", str(empty)],
             f"calibration folder {empty} holds no image files it can read"),
            (["--int8", "--calibrate", str(fmnist_checkpoint)],
             f"calibration folder {fmnist_checkpoint} is not a folder"),
            (["--calibrate", str(MINI / "train")], "--calibrate is for static int8: add --int8"),
            (["--int8", "--calibration-images", "10"], "--calibration-images needs --calibrate"),
            (["--int8", "--calibrate", str(MINI / "train"), "--calibration-images", "0"],
             "calibration images must be at least 1, got 0")]:
        assert main(export + args) == 2
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and message in errors[0], errors
        assert not out.exists()  # refused before the export ran


def test_a_calibration_image_that_cannot_be_read_is_named(fmnist_checkpoint, tmp_path, capsys):
    folder = tmp_path / "calibration"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "model.onnx"
    assert main(["export", str(fmnist_checkpoint), "--out", str(out), "--int8",
                 "--calibrate", str(folder)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and f"calibration image {folder / 'broken.png'} cannot be read" in (
        errors[0]), errors
    assert not (tmp_path / "model.int8.onnx").exists()


def test_calibration_images_are_spread_over_the_classes():
    chosen = calibration_images(MINI / "test", 20)
    assert len(chosen) == 20 and len({p.parent.name for p in chosen}) == 10
    assert len(calibration_images(MINI / "test" / "Bag", 1000)) == 50  # all, when fewer
