"""Weight-decay groups and head-only training."""

import pytest
import torch

from vistra import create_model
from vistra.train.params import freeze_all_but_head, param_groups


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_vit_no_decay_group_holds_norms_biases_tokens_and_pos_embed():
    model = create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1)
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {"cls_token", "dist_token", "pos_embed", "norm.weight", "norm.bias",
            "blocks.0.attn.qkv.bias", "head.bias"} <= _names(model, no_decay)
    assert _names(model, decay) == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                    "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
                                    "blocks.0.mlp.fc2.weight", "head.weight",
                                    "head_dist.weight"}


def test_swin_relative_position_bias_tables_get_no_decay():
    model = create_model("swin_tiny_patch4_window7_224", img_size=32, depths=(1, 1, 1, 1),
                         window_size=2)
    _, no_decay = param_groups(model, 0.05)
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and tables <= _names(model, no_decay)


def test_freeze_trains_only_head_and_pre_logits():
    model = create_model("vit_base_patch16_224_in21k", img_size=32, depth=1, num_classes=4)
    trainable = freeze_all_but_head(model)
    assert set(trainable) == {"pre_logits.fc.weight", "pre_logits.fc.bias",
                              "head.weight", "head.bias"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    decay, no_decay = param_groups(model, 0.1)
    assert len(decay["params"]) + len(no_decay["params"]) == 4


def test_freeze_of_a_frozen_forward_leaves_backbone_gradients_empty():
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1,
                         num_classes=3)
    freeze_all_but_head(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.head.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad is None


def test_freezing_a_model_without_head_is_an_error():
    with pytest.raises(ValueError, match="no head to train"):
        freeze_all_but_head(create_model("vit_tiny_patch16_224", img_size=32, depth=1,
                                         num_classes=0))
