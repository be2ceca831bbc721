"""ViT / DeiT weights: timm and torchvision layouts, containers told apart by content, and the
adaptations (head, pre-logits, image size) with their report; mismatches name the model."""

import argparse
import logging
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vistra
from vistra.weights import load_pretrained
from vistra.weights.identify import architecture_facts, likely_models

TINY = dict(depth=2, num_classes=5)


def random_vit(name="vit_tiny_patch16_224", seed=0, **kw):
    torch.manual_seed(seed)
    return vistra.create_model(name, **{**TINY, **kw}).eval()


def tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_outputs(a, b, size=224):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


# --- torchvision, against a reference built with torchvision's structure and names ----------


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision.models.VisionTransformer rebuilt from its source (torchvision is not
    installed here): nn.MultiheadAttention, `mlp` as [Linear, GELU, Dropout, Linear, Dropout],
    LayerNorm eps 1e-6, `heads.head`."""

    def __init__(self, image_size=224, patch=16, dim=192, depth=2, heads=3, classes=5):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1,
                                                              dim))
        self.encoder.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads)) for i in range(depth)))
        self.encoder.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.encoder.ln(self.encoder.layers(x + self.encoder.pos_embedding))
        return self.heads(x[:, 0])


def test_torchvision_vit_matches_a_reference_built_like_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = TorchvisionViT().eval()
    torch.save(reference.state_dict(), tmp_path / "vit_b_16-c867db91.pth")
    model = vistra.create_model("vit_tiny_patch16_224", **TINY)
    report = load_pretrained(model, tmp_path / "vit_b_16-c867db91.pth")
    assert report.layout == "torchvision ViT"
    assert_same_outputs(model, reference)


def test_torchvision_vit_before_0_13_names_its_mlp_linear_1_and_linear_2(tmp_path):
    torch.manual_seed(0)
    reference = TorchvisionViT().eval()
    legacy = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
              for k, v in reference.state_dict().items()}
    torch.save(legacy, tmp_path / "old.pth")
    model = vistra.create_model("vit_tiny_patch16_224", pretrained=tmp_path / "old.pth", **TINY)
    assert_same_outputs(model, reference)


# --- timm layout and containers ---------------------------------------------------------------


def test_distilled_deit_in_timm_layout_loads_as_it_is(tmp_path):
    source = random_vit("deit_tiny_distilled_patch16_224")
    torch.save(tensors(source), tmp_path / "deit.pth")
    model = vistra.create_model("deit_tiny_distilled_patch16_224", **TINY)
    report = load_pretrained(model, tmp_path / "deit.pth")
    assert report.layout == "timm ViT" and report.loaded == len(source.state_dict())
    assert_same_outputs(model, source)


@pytest.mark.parametrize("writer,name", [
    ("safetensors", "weights.bin"),  # safetensors under a .bin name
    ("zip", "weights.safetensors"),  # a torch zip under a .safetensors name
    ("legacy", "weights.pth"),  # torch's pre-1.6 pickle format
])
def test_container_is_recognised_by_content_not_name(tmp_path, writer, name):
    source = random_vit()
    path = tmp_path / name
    if writer == "safetensors":
        save_file(tensors(source), path)
    else:
        torch.save(tensors(source), path, _use_new_zipfile_serialization=writer == "zip")
    model = vistra.create_model("vit_tiny_patch16_224", pretrained=path, **TINY)
    assert_same_outputs(model, source)


def test_training_checkpoint_gives_the_model_without_wrappers(tmp_path):
    source, ema = random_vit(), random_vit(seed=1)
    torch.save({"model": {f"module.{k}": v for k, v in tensors(source).items()},
                "model_ema": tensors(ema), "epoch": 5,
                "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4)},
               tmp_path / "checkpoint.pth")
    model = vistra.create_model("vit_tiny_patch16_224", **TINY)
    report = load_pretrained(model, tmp_path / "checkpoint.pth")
    assert_same_outputs(model, source)
    assert report.notes == ["took checkpoint['model']; ignored args, epoch, model_ema",
                            "removed the 'module.' prefix of every key"]


# --- adaptation -------------------------------------------------------------------------------


def test_other_class_count_replaces_both_distilled_heads_only(tmp_path, caplog):
    source = random_vit("deit_tiny_distilled_patch16_224")
    torch.save(tensors(source), tmp_path / "deit.pth")
    model = vistra.create_model("deit_tiny_distilled_patch16_224", depth=2, num_classes=3)
    with caplog.at_level(logging.INFO, logger="vistra.weights"):
        report = load_pretrained(model, tmp_path / "deit.pth")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", str(report))]
    assert model.num_classes == 3 and model.head_dist.out_features == 3
    assert report.reinitialised == ["head.bias", "head.weight", "head_dist.bias",
                                    "head_dist.weight"]
    assert report.changes == ["head initialised fresh for 3 classes (the file's has 5)",
                              "distillation head initialised fresh for 3 classes (the file's "
                              "has 5)"]
    for k, v in model.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(v, source.state_dict()[k]), k


def test_21k_pre_logits_are_kept_when_the_model_has_them(tmp_path):
    source = random_vit(representation_size=192, num_classes=21843)
    torch.save(tensors(source), tmp_path / "in21k.pth")
    model = vistra.create_model("vit_tiny_patch16_224", depth=2, representation_size=192,
                                num_classes=10)
    report = load_pretrained(model, tmp_path / "in21k.pth")
    assert torch.equal(model.pre_logits.fc.weight, source.pre_logits.fc.weight)
    assert report.reinitialised == ["head.bias", "head.weight"]


def test_pre_logits_are_dropped_when_the_model_has_none(tmp_path):
    source = random_vit(representation_size=192)
    torch.save(tensors(source), tmp_path / "in21k.pth")
    model = vistra.create_model("vit_tiny_patch16_224", **TINY)
    report = load_pretrained(model, tmp_path / "in21k.pth")
    # Same class count, but the head was trained on the pre-logits output: it goes too.
    assert report.dropped == ["pre_logits.fc.bias", "pre_logits.fc.weight", "head.bias",
                              "head.weight"]
    assert report.changes == ["pre-logits layer dropped: the model has none",
                              "head initialised fresh: the pre-logits layer before it changed"]


def test_other_image_size_resamples_positions_and_keeps_class_tokens(tmp_path):
    source = random_vit("deit_tiny_distilled_patch16_224")
    torch.save(tensors(source), tmp_path / "deit.pth")
    model = vistra.create_model("deit_tiny_distilled_patch16_224", img_size=288,
                                pretrained=tmp_path / "deit.pth", **TINY).eval()
    assert model.pos_embed.shape == (1, 2 + 18 * 18, 192)
    assert torch.equal(model.pos_embed[:, :2], source.pos_embed[:, :2])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 288, 288)).shape == (1, 5)


# --- mismatches -------------------------------------------------------------------------------


def test_weights_of_another_model_list_the_keys_and_name_the_likely_model(tmp_path):
    torch.save(tensors(random_vit("vit_small_patch16_224", depth=1)), tmp_path / "small.pth")
    with pytest.raises(ValueError) as err:
        vistra.create_model("vit_tiny_patch16_224", depth=1, pretrained=tmp_path / "small.pth")
    message = str(err.value)
    assert "do not fit vit_tiny_patch16_224" in message
    assert "different shapes" in message and "cls_token (1, 1, 384) in the file" in message
    assert "vit_small_patch16_224" in message and "overrides for depth" in message


@pytest.mark.parametrize("name", ["vit_base_patch16_384", "vit_large_patch16_224_in21k",
                                  "deit_small_distilled_patch16_224", "vit_base_r50_s16_384",
                                  "swin_base_patch4_window12_384_in22k"])
def test_full_size_files_are_recognised_from_their_shapes(name):
    with torch.device("meta"):
        state = vistra.create_model(name).state_dict()
    names, differ = likely_models(architecture_facts(state))
    assert names == [name] and differ == []


def test_unknown_layout_is_named(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unrecognised weights layout.*encoder.weight"):
        vistra.create_model("vit_tiny_patch16_224", depth=1,
                            pretrained=tmp_path / "other.safetensors")
