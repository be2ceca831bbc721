"""Weights by name from a HuggingFace cache built here (models--org--name/refs/main and
snapshots/<sha>/), with every socket blocked: each name form loads the saved tensors, class
names come along (id2label, or ImageNet-1k's for 1000 classes), and a name that is not
cached fails at once with the cache path and the command that fills it."""

import json
import socket
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vistra
from vistra.cli import main
from vistra.weights import read_metadata
from vistra.weights.labels import imagenet_1k_classes, read_class_names

SHA = "0123456789abcdef0123456789abcdef01234567"
TIMM_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
TIMM_BIN_REPO = "timm/deit_tiny_patch16_224.fb_in1k"
HF_REPO = "acme/vit-tiny-pets"
PETS = ["cat", "dog", "fish"]


def add_repo(cache, repo: str, files: dict) -> None:
    """A repository as huggingface_hub's cache holds it after a download."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SHA)
    snapshot = folder / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def json_file(data: dict):
    return lambda path: path.write_text(json.dumps(data))


def transformers_layout(state: dict) -> dict:
    """vistra's ViT keys -> transformers' ViTForImageClassification keys (written out here
    by hand, independently of vistra's converter)."""
    out = {"vit.embeddings.cls_token": state["cls_token"],
           "vit.embeddings.position_embeddings": state["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "vit.layernorm.weight": state["norm.weight"], "vit.layernorm.bias": state["norm.bias"],
           "classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        hf, ours = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{ours}attn.qkv.{kind}"].chunk(3)
            out.update({
                f"{hf}attention.attention.query.{kind}": q,
                f"{hf}attention.attention.key.{kind}": k,
                f"{hf}attention.attention.value.{kind}": v,
                f"{hf}attention.output.dense.{kind}": state[f"{ours}attn.proj.{kind}"],
                f"{hf}intermediate.dense.{kind}": state[f"{ours}mlp.fc1.{kind}"],
                f"{hf}output.dense.{kind}": state[f"{ours}mlp.fc2.{kind}"],
                f"{hf}layernorm_before.{kind}": state[f"{ours}norm1.{kind}"],
                f"{hf}layernorm_after.{kind}": state[f"{ours}norm2.{kind}"],
            })
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def saved():
    """Randomly initialised weights: a 1000-class ViT-Ti whose class 0 always wins, a
    DeiT-Ti, and a 3-class ViT-Ti."""
    torch.manual_seed(0)
    vit = vistra.create_model("vit_tiny_patch16_224").state_dict()
    vit["head.bias"] = torch.zeros(1000).index_fill_(0, torch.tensor([0]), 100.0)
    deit = vistra.create_model("deit_tiny_patch16_224").state_dict()
    pets = vistra.create_model("vit_tiny_patch16_224", num_classes=3).state_dict()
    return {"vit": vit, "deit": deit, "pets": pets}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, saved):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    timm_config = {"architecture": "vit_tiny_patch16_224", "num_classes": 1000,
                   "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                      "crop_pct": 0.9, "interpolation": "bicubic"}}
    add_repo(cache, TIMM_REPO, {
        "config.json": json_file(timm_config),
        "model.safetensors": lambda p: save_file(saved["vit"], str(p))})
    add_repo(cache, TIMM_BIN_REPO, {
        "config.json": json_file({"architecture": "deit_tiny_patch16_224"}),
        "pytorch_model.bin": lambda p: torch.save(saved["deit"], p)})
    add_repo(cache, HF_REPO, {
        "config.json": json_file({"architectures": ["ViTForImageClassification"],
                                  "model_type": "vit", "image_size": 224,
                                  "id2label": {str(i): n for i, n in enumerate(PETS)}}),
        "model.safetensors": lambda p: save_file(transformers_layout(saved["pets"]), str(p))})
    return cache


@pytest.fixture
def hub(cache, monkeypatch):
    """The cache above as huggingface_hub's, offline, with sockets that refuse to connect."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    return cache


def assert_holds(model, state):
    got = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name, pretrained", [
    ("vit_tiny_patch16_224", True),
    ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", True),
    ("vit_tiny_patch16_224", "augreg_in21k_ft_in1k"),
    ("vit_tiny_patch16_224", f"hf-hub:{TIMM_REPO}"),
    ("vit_tiny_patch16_224", TIMM_REPO),
    (f"hf-hub:{TIMM_REPO}", None),
], ids=["default-tag", "tagged-name", "tag", "hf-hub", "repo-id", "repo-as-model"])
def test_every_name_form_loads_the_timm_repo(hub, saved, name, pretrained):
    model = vistra.create_model(name, pretrained=pretrained)
    assert model.name == "vit_tiny_patch16_224"
    assert_holds(model, saved["vit"])
    assert model.classes == imagenet_1k_classes() and model.classes[0] == "tench"
    assert model.data_config.mean == (0.5, 0.5, 0.5) and model.data_config.crop_pct == 0.9
    assert model.load_report.origin == f"hf-hub:{TIMM_REPO}"


def test_timm_repo_with_a_pickle_and_transformers_repo_load(hub, saved):
    deit = vistra.create_model("deit_tiny_patch16_224", pretrained=True)
    assert_holds(deit, saved["deit"])
    by_shape = vistra.create_model(HF_REPO)
    assert by_shape.name == "vit_tiny_patch16_224"  # transformers' model_type, not DeiT-Ti
    for model in (by_shape,
                  vistra.create_model("vit_tiny_patch16_224", pretrained=f"hf-hub:{HF_REPO}")):
        assert_holds(model, saved["pets"])
        assert model.classes == PETS and model.arch.num_classes == 3


def test_a_name_not_in_the_cache_says_where_and_how_at_once(hub):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        vistra.create_model("vit_small_patch16_224", pretrained=True)
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert str(hub / "models--timm--vit_small_patch16_224.augreg_in21k_ft_in1k") in message
    assert "huggingface-cli download timm/vit_small_patch16_224.augreg_in21k_ft_in1k" in message


def test_converted_imagenet_checkpoint_predicts_with_names(hub, tmp_path, capsys):
    out = tmp_path / "vit.safetensors"
    assert main(["convert", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", str(out)]) == 0
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path / "red.png"), "--topk", "1"]) == 0
    assert "tench" in capsys.readouterr().out
    assert read_metadata(out)["model_name"] == "vit_tiny_patch16_224"


def test_convert_takes_class_names_from_a_file(hub, tmp_path):
    lines, listed = tmp_path / "names.txt", tmp_path / "names.json"
    lines.write_text("bird\nhorse\n\nsnake\n")
    listed.write_text(json.dumps(["a", "b", "c"]))
    assert read_class_names(lines) == ["bird", "horse", "snake"]
    for names, expected in [(lines, ["bird", "horse", "snake"]), (listed, ["a", "b", "c"])]:
        out = tmp_path / f"{names.suffix[1:]}.safetensors"
        assert main(["convert", HF_REPO, str(out), "--classes", str(names)]) == 0
        assert read_metadata(out)["classes"] == expected
    assert main(["convert", f"hf-hub:{HF_REPO}", str(tmp_path / "pets.safetensors")]) == 0
    assert read_metadata(tmp_path / "pets.safetensors")["classes"] == PETS
    listed.write_text(json.dumps(["just one"]))
    assert main(["convert", HF_REPO, str(tmp_path / "x.safetensors"), "--classes",
                 str(listed)]) == 2


def test_training_starts_from_a_cached_name(hub, saved):
    from vistra.train import TrainConfig
    from vistra.train.loop import _build_model

    cfg = TrainConfig(data="unused", model="vit_tiny_patch16_224", weights=f"hf-hub:{TIMM_REPO}")
    model = _build_model(cfg, 5, cfg.weights)
    assert model.arch.num_classes == 5 and model.classes is None
    assert_holds(model, {k: v for k, v in saved["vit"].items() if not k.startswith("head.")})


def test_a_checkpoint_without_names_for_1000_classes_loads_imagenets(tmp_path):
    from vistra.weights import load_checkpoint, save_checkpoint

    path = tmp_path / "m.safetensors"
    save_checkpoint(vistra.create_model("vit_tiny_patch16_224", depth=1), path)
    assert read_metadata(path)["classes"] is None
    assert load_checkpoint(path).classes[0] == "tench"
