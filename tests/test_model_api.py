"""timm's model API on vistra's models: head access, no-weight-decay names, gradient
checkpointing, feature maps (features_only, forward_intermediates) checked against
HuggingFace's hidden states for the same weights, and the distilled DeiT's typed output."""

import pytest
import torch

import vistra
from vistra.models import DistilledLogits
from vistra.runtime import mean_logits

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, num_classes=4)
TINY_SWIN = dict(img_size=32, embed_dim=12, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 num_classes=4)


def tiny(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "vit":
        return vistra.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **kw})
    return vistra.create_model("swin_tiny_patch4_window7_224", **{**TINY_SWIN, **kw})


def test_get_and_reset_classifier():
    model = tiny("vit", distilled=True)
    head, head_dist = model.get_classifier()
    assert head is model.head and head_dist is model.head_dist
    model.reset_classifier(7, global_pool="token")
    assert model.arch.num_classes == 7 and model.head.out_features == 7
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="global_pool='token'"):
        model.reset_classifier(7, global_pool="avg")
    swin = tiny("swin")
    swin.reset_classifier(0)
    assert swin.get_classifier() is swin.head and swin.arch.num_classes == 0
    assert swin(torch.randn(2, 3, 32, 32)).shape == (2, swin.num_features)
    features = swin.forward_features(torch.randn(2, 3, 32, 32))
    assert swin.forward_head(features, pre_logits=True).shape == (2, 24)


def test_no_weight_decay_names_the_tokens_and_bias_tables():
    assert tiny("vit", distilled=True).no_weight_decay() == {"cls_token", "dist_token",
                                                             "pos_embed"}
    tables = tiny("swin").no_weight_decay()
    assert len(tables) == 4 and all(n.endswith("relative_position_bias_table") for n in tables)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(kind):
    x = torch.randn(2, 3, 32, 32)
    grads, runs = [], []
    for enabled in (False, True):
        model = tiny(kind, drop_path_rate=0.0).train()
        model.set_grad_checkpointing(enabled)
        block = model.blocks[0] if kind == "vit" else model.layers[0].blocks[0]
        calls: list[int] = []
        block.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        runs.append(len(calls))
    assert runs == [1, 2]  # the block ran again in the backward pass
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_features_only_gives_timm_layouts_at_full_size():
    with torch.device("meta"):
        swin = vistra.create_model("swin_tiny_patch4_window7_224", features_only=True)
        vit = vistra.create_model("vit_base_patch16_224", features_only=True,
                                  out_indices=(2, 5, 8, 11), output_fmt="NHWC")
        x = torch.empty(2, 3, 224, 224)
        assert [tuple(t.shape) for t in swin(x)] == [(2, 96, 56, 56), (2, 192, 28, 28),
                                                     (2, 384, 14, 14), (2, 768, 7, 7)]
        assert [tuple(t.shape) for t in vit(x)] == [(2, 14, 14, 768)] * 4
    assert [f["reduction"] for f in swin.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in vit.feature_info] == ["blocks.2", "blocks.5", "blocks.8",
                                                       "blocks.11"]
    with torch.device("meta"):
        default = vistra.create_model("vit_base_patch16_224", features_only=True)
    assert default.out_indices == [9, 10, 11]  # timm's default for ViT: the last three


def test_intermediates_follow_timm_indices():
    model = tiny("vit").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(maps) == 3 and maps[0].shape == (1, 24, 4, 4)
    torch.testing.assert_close(last_two, maps[1:])
    torch.testing.assert_close(picked, [maps[0], maps[2]])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])


def test_distilled_deit_declares_its_training_output():
    model = tiny("vit", distilled=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, DistilledLogits) and out.logits.shape == out.logits_dist.shape
    torch.testing.assert_close(mean_logits(out), (out.logits + out.logits_dist) / 2)
    assert isinstance(model.eval()(torch.randn(2, 3, 32, 32)), torch.Tensor)


@pytest.mark.slow
def test_feature_maps_equal_huggingface_hidden_states(tmp_path):
    """Same weights in both (saved by transformers, loaded by vistra): ViT's block outputs
    are transformers' hidden_states[i + 1] without the class token; Swin's stage maps are
    its reshaped_hidden_states before downsampling (transformers merges at a stage's end)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    vit_cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                     intermediate_size=96, image_size=224, patch_size=16,
                                     layer_norm_eps=1e-6, num_labels=5)
    swin_cfg = transformers.SwinConfig(image_size=224, patch_size=4, embed_dim=24,
                                       depths=[2, 2, 2, 2], num_heads=[1, 2, 3, 4],
                                       window_size=7, num_labels=5, layer_norm_eps=1e-5)
    hf_vit = transformers.ViTForImageClassification(vit_cfg).eval()
    hf_swin = transformers.SwinForImageClassification(swin_cfg).eval()
    hf_vit.save_pretrained(tmp_path / "vit")
    hf_swin.save_pretrained(tmp_path / "swin")
    vit = vistra.create_model("vit_base_patch16_224", embed_dim=48, depth=3, num_heads=3,
                              mlp_ratio=2.0, pretrained=tmp_path / "vit", features_only=True,
                              out_indices=(0, 1, 2))
    swin = vistra.create_model("swin_tiny_patch4_window7_224", embed_dim=24,
                               depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4),
                               pretrained=tmp_path / "swin", features_only=True)
    with torch.no_grad():
        hidden = hf_vit.vit(pixel_values=x, output_hidden_states=True).hidden_states
        stages = hf_swin.swin(pixel_values=x, output_hidden_states=True,
                              output_hidden_states_before_downsampling=True
                              ).reshaped_hidden_states
        vit_maps, swin_maps = vit.eval()(x), swin.eval()(x)
    for i, got in enumerate(vit_maps):
        expected = hidden[i + 1][:, 1:].reshape(2, 14, 14, 48).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(swin_maps) == 4
    for got, expected in zip(swin_maps, stages[1:], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
