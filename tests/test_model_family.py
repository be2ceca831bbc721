"""A model family is one model class and one registration: a toy family defined here, known to
no vistra module, is listed and counted by `vistra models` and `vistra flops`, builds, trains
with the right optimizer groups and head freezing, trains an epoch with `vistra.train`, saves
and loads as a checkpoint, is explained by the methods it declares and exports to ONNX."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vistra
import vistra.models.family as family_module
import vistra.models.registry as registry_module
from vistra.analysis.complexity import model_cost, stages, unmodelled_fields
from vistra.cli import main
from vistra.explain import default_method, methods_for
from vistra.explain.perturbation import occlusion
from vistra.models import (
    ModelFamily,
    SwinConfig,
    SwinTransformer,
    VisionTransformer,
    VistraModel,
    ViTConfig,
    register,
    register_family,
)
from vistra.models.layers import to_2tuple
from vistra.onnx import export_checkpoint, read_onnx_metadata
from vistra.train import TrainConfig, train
from vistra.train.params import freeze_all_but_head, param_groups
from vistra.weights import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class ToyConfig:
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 7
    patch_size: int = 8
    embed_dim: int = 16
    depth: int = 2


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ToyNet(VistraModel):
    """Patches -> MLP blocks -> mean token -> head, with a learned position embedding."""

    family = "toy"
    no_weight_decay_names = ("pos_embed",)

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__(cfg)
        h, w = to_2tuple(cfg.img_size)  # an int, or a pair as build_model passes it
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size,
                                     cfg.patch_size)
        tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, cfg.embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[ToyBlock(cfg.embed_dim) for _ in range(cfg.depth)])
        self.reset_classifier(cfg.num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head = nn.Linear(self.cfg.embed_dim, num_classes) if num_classes else nn.Identity()
        self._set_num_classes(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.blocks(x).mean(1))


TOY_PARAMS = (3 * 8 * 8 * 16 + 16) + 16 * 16 + 2 * (2 * 16 + 16 * 32 + 32 + 32 * 16 + 16) \
    + (16 * 7 + 7)
TOY_MACS = 16 * (3 * 8 * 8 * 16) + 2 * 16 * (16 * 32 + 32 * 16) + 16 * 7  # 16 patches


@pytest.fixture
def toy(monkeypatch):
    """The toy family and one variant, registered for this test only."""
    monkeypatch.setattr(family_module, "_FAMILIES", dict(family_module._FAMILIES))
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register_family(ModelFamily("toy", "Toy", ToyConfig, ToyNet,
                                explain_methods=("occlusion", "gradient"),
                                token_stride=lambda model: model.cfg.patch_size))
    register("toy_tiny", ToyConfig(), crop_pct=1.0)
    return "toy_tiny"


def test_listed_and_counted_by_running_it(toy, capsys):
    assert main(["models", "toy*", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {"name": "toy_tiny", "params": TOY_PARAMS, "macs": TOY_MACS,
                   "img_size": [32, 32], "num_classes": 7, "pretrained": None}
    assert main(["flops", toy, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs"] == TOY_MACS and report["stages"] == []
    assert report["by_stage"]["blocks"] == {"mlp": 2 * 16 * (16 * 32 + 32 * 16)}


def test_without_an_analytic_count_complexity_says_so(toy):
    arch = ToyConfig()
    assert stages(arch) == []
    assert unmodelled_fields(arch)
    with pytest.raises(ValueError, match="Toy family has no analytic count"):
        model_cost(arch)


def test_builds_with_its_card_and_trains_with_the_right_groups(toy):
    model = vistra.create_model(toy, num_classes=3)
    assert (model.name, model.card.family, model.arch.num_classes) == (toy, "toy", 3)
    assert model.data_config.crop_pct == 1.0 and model.data_config.img_size == (32, 32)
    decay, no_decay = param_groups(model, 0.05)
    named = dict(model.named_parameters())
    no_decay_names = {n for n, p in named.items() if any(p is q for q in no_decay["params"])}
    assert "pos_embed" in no_decay_names and "blocks.0.mlp.0.bias" in no_decay_names
    assert {n for n, p in named.items() if p.ndim > 1} - {"pos_embed"} == \
        {n for n, p in named.items() if any(p is q for q in decay["params"])}
    assert freeze_all_but_head(model) == ["head.weight", "head.bias"]


def test_saves_and_loads_as_a_checkpoint(toy, tmp_path):
    model = vistra.create_model(toy)
    model.classes = [f"class {i}" for i in range(7)]
    save_checkpoint(model, tmp_path / "toy.safetensors")
    loaded = load_checkpoint(tmp_path / "toy.safetensors")
    assert type(loaded) is ToyNet and loaded.name == toy and loaded.classes == model.classes
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("model", [
    VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                num_classes=4)),
    SwinTransformer(SwinConfig(img_size=32, embed_dim=12, depths=(2, 2), num_heads=(2, 4),
                               window_size=4, num_classes=4)),
], ids=["vit", "swin"])
def test_a_model_built_from_its_class_saves_and_loads(model, tmp_path):
    """Its card exists from construction on: the family's name, the config, classes."""
    model.reset_classifier(5)
    assert model.name == model.card.family and model.arch.num_classes == 5
    model.classes = list("abcde")
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.classes == list("abcde") and loaded.arch == model.arch


def colour_folder(root, size=32, per_class=6):
    """root/<colour>/<i>.png: noisy solid colours of two classes."""
    rng = np.random.default_rng(0)
    for name, rgb in {"blue": (30, 30, 220), "red": (220, 30, 30)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_trains_an_epoch_and_its_best_checkpoint_answers_as_the_trained_model(toy, tmp_path):
    result = train(TrainConfig(data=str(colour_folder(tmp_path / "data")), model=toy,
                               output=str(tmp_path / "run"), epochs=1, batch_size=4, workers=0,
                               device="cpu", quiet=True))
    assert [r["epoch"] for r in result.history] == [1]
    best = load_checkpoint(result.run_dir / "best.safetensors").eval()
    assert type(best) is ToyNet and best.name == toy and best.classes == ["blue", "red"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(best(x), result.model.eval()(x))


def test_explained_by_its_declared_default_at_the_inputs_size(toy):
    model = vistra.create_model(toy).eval()
    assert methods_for(model) == ("occlusion", "rise", "gradient")  # rise: any model's
    assert default_method(model) == "occlusion"
    e = vistra.explain(model, torch.randn(3, 32, 32))
    assert e.method == "occlusion" and e.map.shape == (32, 32)
    assert 0 <= float(e.map.min()) and float(e.map.max()) <= 1
    image = Image.new("RGB", (48, 40), (200, 30, 30))  # resized and centre-cropped to 32
    assert vistra.explain(model, image, method="gradient").map.shape == (40, 48)
    with pytest.raises(ValueError, match="does not apply"):
        vistra.explain(model, torch.randn(3, 32, 32), method="rollout")


def test_occlusion_is_the_log_probability_drop_of_each_hidden_token(toy):
    """Windows of one token, stride one token: each token's square holds its own drop."""
    model = vistra.create_model(toy).eval()
    x = torch.randn(1, 3, 32, 32)
    drops, _ = occlusion(model, x, torch.tensor([2]), window=8, stride=8, batch_size=5)
    assert drops.shape == (1, 32, 32)
    colour = x.mean((2, 3), keepdim=True)  # what hides a window: the image's mean colour
    with torch.no_grad():
        base = model(x).log_softmax(-1)[0, 2]
        for r in range(4):
            for c in range(4):
                square = (..., slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
                hidden = x.clone()
                hidden[square] = colour
                expected = base - model(hidden).log_softmax(-1)[0, 2]
                torch.testing.assert_close(drops[0][square[1:]], expected.expand(8, 8))


def test_a_family_that_declares_no_methods_is_explained_by_the_input_gradient(toy):
    register_family(ModelFamily("toy", "Toy", ToyConfig, ToyNet))
    model = vistra.create_model(toy).eval()
    assert default_method(model) == "gradient"
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(x)[0, 4].backward()
    saliency = x.grad.abs().amax(1)[0]
    e = vistra.explain(model, x[0].detach(), target=4)
    torch.testing.assert_close(e.map, (saliency - saliency.min()) / (saliency.max() -
                                                                     saliency.min()))
    assert vistra.explain(model, x[0].detach(), method="occlusion").map.shape == (32, 32)


def test_exports_to_onnx_that_answers_as_pytorch_at_its_own_size(toy, tmp_path):
    """No size rule declared: the graph takes the export size only, and says so."""
    ort = pytest.importorskip("onnxruntime")
    model = vistra.create_model(toy).eval()
    model.classes = [f"class {i}" for i in range(7)]
    save_checkpoint(model, tmp_path / "toy.safetensors")
    result = export_checkpoint(tmp_path / "toy.safetensors", tmp_path / "toy.onnx")
    meta = read_onnx_metadata(result.path)
    assert (meta.name, meta.classes, meta.size_multiple) == (toy, model.classes, 0)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="[Dd]imension|[Ss]hape"):
        session.run(None, {"image": torch.randn(1, 3, 40, 40).numpy()})
