"""Swin weights in every layout users have: the authors' (with their buffers, and training
checkpoints), timm's two layouts, torchvision's; window-size adaptation."""

import re
import sys
import types

import pytest
import torch

import vistra
from vistra.weights import load_pretrained

NAME = "swin_tiny_patch4_window7_224"
# Narrower and at 112 pixels to keep tests fast: maps of 28, 14, 7 and 4 tokens, so stages 0-1
# shift their windows and stage 3 uses one 4x4 window.
KW = dict(depths=(2, 2, 2, 2), embed_dim=48, num_classes=5, img_size=112)
SIZE = 112


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return vistra.create_model(NAME, **KW).eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def timm_new_layout(model):
    """timm >= 0.9: merging at the start of stages 1..3, head under head.fc."""
    return {re.sub(r"^head\.", "head.fc.", k): v for k, v in state(model).items()}


def official_relative_position_index(M):
    """As the authors' WindowAttention builds it."""
    coords = torch.stack(torch.meshgrid([torch.arange(M), torch.arange(M)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += M - 1
    rel[:, :, 1] += M - 1
    rel[:, :, 0] *= 2 * M - 1
    return rel.sum(-1)


def authors_layout(model):
    """microsoft/Swin-Transformer: merging at the end of stages 0..2 and the buffers saved."""
    out = {}
    for k, v in state(model).items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.+)", k)
        out[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            M = block.window_size
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = (
                official_relative_position_index(M))
            if j % 2:  # shifted blocks carry their mask, [windows, M*M, M*M]
                side = -(-SIZE // 4 // 2 ** i // M) * M  # padded to whole windows
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(
                    (side // M) ** 2, M * M, M * M)
    return out


def assert_same_outputs(a, b):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


def test_authors_checkpoint_with_buffers_matches_timm_current_layout(tmp_path, source):
    torch.save({"model": authors_layout(source)}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    torch.save(timm_new_layout(source), tmp_path / "timm.pth")
    authors = vistra.create_model(NAME, **KW)
    report = load_pretrained(authors, tmp_path / "swin_tiny_patch4_window7_224.pth")
    timm = vistra.create_model(NAME, pretrained=tmp_path / "timm.pth", **KW)
    assert_same_outputs(authors, timm)
    assert_same_outputs(authors, source)
    assert not report.changes and not report.reinitialised
    assert any("relative_position_index" in n and "attn_mask" in n for n in report.notes)


@pytest.fixture
def fake_yacs(monkeypatch):
    """A stand-in for yacs, present only while the checkpoint is written."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, fields=None):
            super().__init__(fields or {})
            self.__dict__["__immutable__"] = True

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def test_authors_training_checkpoint_gives_only_the_model(tmp_path, source, fake_yacs,
                                                          monkeypatch):
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-4)
    source(torch.randn(1, 3, SIZE, SIZE)).sum().backward()
    optimizer.step()
    source.zero_grad()
    config = fake_yacs({"MODEL": fake_yacs({"TYPE": "swin", "DROP_PATH_RATE": 0.2})})
    torch.save({"model": authors_layout(source), "optimizer": optimizer.state_dict(),
                "lr_scheduler": {"last_epoch": 3}, "max_accuracy": 71.5, "scaler": {},
                "epoch": 3, "config": config}, tmp_path / "ckpt_epoch_3.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")  # loading must not need yacs
    model = vistra.create_model(NAME, **KW)
    report = load_pretrained(model, tmp_path / "ckpt_epoch_3.pth")
    assert_same_outputs(model, source)
    assert ("took checkpoint['model']; ignored config, epoch, lr_scheduler, max_accuracy, "
            "optimizer, scaler") in report.notes


def test_timm_old_layout_loads(tmp_path, source):
    torch.save({"state_dict": {k: v for k, v in authors_layout(source).items()
                               if "relative_position_index" not in k}}, tmp_path / "old.pth")
    model = vistra.create_model(NAME, pretrained=tmp_path / "old.pth", **KW)
    assert_same_outputs(model, source)


def torchvision_layout(model):
    """torchvision.models.swin_t: features = [embed, stage 0, merge, stage 1, merge, ...]."""
    out = {}
    for k, v in state(model).items():
        k = k.replace("patch_embed.proj.", "features.0.0.").replace("patch_embed.norm.",
                                                                     "features.0.2.")
        k = k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.3.")
        k = re.sub(r"^layers\.(\d+)\.blocks\.",
                   lambda m: f"features.{2 * int(m[1]) + 1}.", k)
        k = re.sub(r"^layers\.(\d+)\.downsample\.",
                   lambda m: f"features.{2 * int(m[1])}.", k)
        out[k] = v
    for i, stage in enumerate(model.layers):
        for j in range(len(stage.blocks)):
            out[f"features.{2 * i + 1}.{j}.attn.relative_position_index"] = (
                official_relative_position_index(stage.blocks[j].window_size).flatten())
    return out


def test_torchvision_swin_loads(tmp_path, source):
    torch.save(torchvision_layout(source), tmp_path / "swin_t-704ceda3.pth")
    model = vistra.create_model(NAME, **KW)
    report = load_pretrained(model, tmp_path / "swin_t-704ceda3.pth")
    assert report.layout == "torchvision Swin"
    assert_same_outputs(model, source)


def test_other_window_size_interpolates_tables_and_keeps_their_centre(tmp_path, source):
    torch.save(timm_new_layout(source), tmp_path / "w7.pth")
    model = vistra.create_model(NAME, window_size=12, **KW)
    report = load_pretrained(model, tmp_path / "w7.pth")
    assert report.changes == [
        "4 relative position bias tables interpolated from 13x13 to 23x23 (bicubic; centre kept)"]
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    old, new = source.state_dict()[key], model.state_dict()[key]
    assert new.shape == (23 * 23, 3)
    torch.testing.assert_close(new[23 * 11 + 11], old[13 * 6 + 6])
    last = "layers.2.blocks.0.attn.relative_position_bias_table"  # 7x7 map: window stays 7
    assert torch.equal(model.state_dict()[last], source.state_dict()[last])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 5)


def test_new_head_leaves_every_other_tensor_as_in_the_file(tmp_path, source):
    torch.save(timm_new_layout(source), tmp_path / "swin.pth")
    model = vistra.create_model(NAME, **{**KW, "num_classes": 3})
    report = load_pretrained(model, tmp_path / "swin.pth")
    assert model.num_classes == 3
    assert report.reinitialised == ["head.bias", "head.weight"]
    assert report.changes == ["head initialised fresh for 3 classes (the file's has 5)"]
    expected = source.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, expected[k]), k
