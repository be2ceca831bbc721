"""ViT specifics: position embeddings at other sizes, attention weights, pre-logits."""

import pytest
import torch

import vistra
from vistra.models import capture_attention
from vistra.models.resample import resample_pos_embed


def test_forward_at_another_size_is_an_error_unless_dynamic():
    model = vistra.create_model("vit_tiny_patch16_224", depth=1).eval()
    with pytest.raises(ValueError, match="does not match the model's img_size 224x224"):
        model(torch.randn(1, 3, 160, 160))
    dynamic = vistra.create_model("vit_tiny_patch16_224", depth=1, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert dynamic(torch.randn(1, 3, 160, 320)).shape == (1, 1000)


def test_dynamic_forward_equals_a_model_built_with_the_resampled_embedding():
    torch.manual_seed(0)
    dynamic = vistra.create_model("vit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    fixed = vistra.create_model("vit_tiny_patch16_224", depth=2, img_size=(128, 192)).eval()
    state = dict(dynamic.state_dict())
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (8, 12), 1)
    fixed.load_state_dict(state)
    x = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))


def test_resample_keeps_prefix_tokens_and_is_identity_at_the_same_grid():
    pos = torch.randn(1, 2 + 14 * 14, 8)
    assert resample_pos_embed(pos, (14, 14), 2) is pos
    out = resample_pos_embed(pos, (24, 24), 2)
    assert out.shape == (1, 2 + 24 * 24, 8)
    assert torch.equal(out[:, :2], pos[:, :2])
    # A constant grid stays constant under bicubic resampling.
    flat = torch.cat([pos[:, :2], torch.full((1, 196, 8), 0.25)], 1)
    torch.testing.assert_close(resample_pos_embed(flat, (7, 9), 2)[:, 2:],
                               torch.full((1, 63, 8), 0.25))


def test_recorded_attention_rows_sum_to_one_and_match_the_fused_output():
    torch.manual_seed(0)
    model = vistra.create_model("vit_tiny_patch16_224", depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fused = model(x)
        with capture_attention(model) as attns:
            explicit = model(x)
    assert len(attns) == 2
    weights = attns[0].recorded
    assert weights.shape == (1, 3, 197, 197)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3, 197))
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert not attns[0].record  # recording stops with the block


def test_pre_logits_is_linear_then_tanh():
    model = vistra.create_model("vit_base_patch16_224_in21k", depth=1, num_classes=3).eval()
    feats = torch.randn(2, 197, 768)
    expected = model.head(torch.tanh(model.pre_logits.fc(feats[:, 0])))
    torch.testing.assert_close(model.forward_head(feats), expected)


def test_hybrid_backbone_gives_a_14x14_map_of_1024_at_224():
    model = vistra.create_model("vit_base_r50_s16_224", depth=1)
    with torch.no_grad():
        fmap = model.patch_embed.backbone(torch.randn(1, 3, 224, 224))
    assert fmap.shape == (1, 1024, 14, 14)


def test_hybrid_uses_tensorflow_same_padding():
    from vistra.models.resnetv2 import same_padding

    # 7x7 stride 2 on 224 pads 2 before and 3 after; 3x3 stride 2 on 56 pads 0 and 1.
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(56, 3, 2) == (0, 1)
    assert same_padding(56, 3, 1) == (1, 1)
