"""The model zoo: published sizes, every name builds and runs, and the bad-input messages."""

import pytest
import torch

import vistra
from vistra.models import get_spec, list_models

PUBLISHED_PARAMS_M = {
    "vit_tiny_patch16_224": 5.717,
    "vit_small_patch16_224": 22.051,
    "vit_base_patch16_224": 86.568,
    "vit_base_patch32_224": 88.224,
    "vit_large_patch16_224": 304.327,
    "vit_large_patch32_224": 306.535,
    "vit_huge_patch14_224": 632.046,
    "vit_base_patch16_384": 86.859,
    "vit_base_r50_s16_224": 98.659,
    "deit_base_distilled_patch16_224": 87.338,
    "swin_tiny_patch4_window7_224": 28.288,
    "swin_small_patch4_window7_224": 49.606,
    "swin_base_patch4_window7_224": 87.768,
    "swin_large_patch4_window7_224": 196.532,
    "swin_base_patch4_window12_384": 87.904,
}


def meta_model(name, **kw):
    with torch.device("meta"):
        return vistra.create_model(name, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,millions", PUBLISHED_PARAMS_M.items())
def test_parameter_count_matches_published(name, millions):
    assert n_params(meta_model(name, num_classes=1000)) / 1e6 == pytest.approx(millions, rel=1e-3)


def test_in21k_vit_without_pre_logits_matches_published():
    model = meta_model("vit_base_patch16_224_in21k", representation_size=None)
    assert model.num_classes == 21843
    assert n_params(model) / 1e6 == pytest.approx(102.596, rel=1e-3)


def test_in21k_variants_carry_pre_logits_and_21k_classes():
    vit = meta_model("vit_large_patch16_224_in21k")
    assert vit.num_classes == 21843 and vit.pre_logits.fc.out_features == 1024
    assert meta_model("swin_base_patch4_window7_224_in22k").num_classes == 21841


def test_registry_holds_every_spec_family():
    names = list_models()
    for expected in ["vit_huge_patch14_224", "vit_large_patch16_384", "deit_tiny_patch16_224",
                     "deit_small_distilled_patch16_224", "vit_base_r50_s16_384",
                     "swin_large_patch4_window12_384", "swin_large_patch4_window12_384_in22k"]:
        assert expected in names
    assert list_models("swin_tiny*") == ["swin_tiny_patch4_window7_224"]


def reduced(name):
    """Fewer blocks (same widths, windows and heads) so every model really runs on a CPU."""
    arch = get_spec(name).arch
    if get_spec(name).family == "swin":
        return {"depths": tuple(1 if i % 2 == 0 else 2 for i in range(len(arch.depths)))}
    return {"depth": 1}


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_at_its_default_size(name):
    torch.manual_seed(0)
    model = vistra.create_model(name, num_classes=7, **reduced(name)).eval()
    h, w = model.data_config.img_size
    with torch.no_grad():
        out = model(torch.randn(1, model.arch.in_chans, h, w))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vit_huge_patch14_224", "swin_large_patch4_window12_384",
                                  "vit_base_r50_s16_384", "vit_large_patch16_224_in21k"])
def test_full_depth_forward_shape_on_meta(name):
    model = meta_model(name).eval()
    x = torch.empty(2, model.arch.in_chans, *model.data_config.img_size, device="meta")
    assert model(x).shape == (2, model.num_classes)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "deit_tiny_distilled_patch16_224"])
def test_num_classes_zero_returns_pooled_features(name):
    model = vistra.create_model(name, num_classes=0, **reduced(name)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, model.num_features)


def test_eval_is_deterministic_and_train_is_not():
    model = vistra.create_model("vit_tiny_patch16_224", depth=2, drop_rate=0.1,
                                drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_distilled_model_returns_both_heads_in_training_and_their_mean_in_eval():
    model = vistra.create_model("deit_tiny_distilled_patch16_224", depth=1, num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cls_logits, dist_logits = model.train()(x)
        assert not torch.allclose(cls_logits, dist_logits)
        assert torch.allclose(model.eval()(x), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_data_config_follows_the_weights():
    assert get_spec("vit_base_patch16_224").data.mean == (0.5, 0.5, 0.5)
    swin = get_spec("swin_base_patch4_window12_384").data
    assert swin.mean == (0.485, 0.456, 0.406) and swin.crop_pct == 1.0
    assert swin.img_size == (384, 384)
    model = vistra.create_model("vit_tiny_patch16_224", img_size=160, depth=1)
    assert model.data_config.img_size == (160, 160)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean .*swin_tiny_patch4_window7_224"):
        vistra.create_model("swin_tiny_patch4_window7")


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="no option window"):
        vistra.create_model("vit_tiny_patch16_224", window=7)


def test_img_size_not_divisible_by_patch_is_rejected():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        vistra.create_model("vit_tiny_patch16_224", img_size=200)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_wrong_channels_and_rank_are_clear_errors(name):
    model = vistra.create_model(name, **reduced(name))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="4-D image batch"):
        model(torch.randn(3, 224, 224))
