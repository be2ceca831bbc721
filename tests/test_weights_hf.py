"""HuggingFace checkpoints load with the logits HuggingFace itself computes (transformers is the
independent reference; small random configs with real head counts and window sizes)."""

import pytest
import torch

import vistra
from vistra.weights import load_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # peer parity; most of the time is importing transformers

VIT = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
           image_size=224, patch_size=16, layer_norm_eps=1e-6, num_labels=5)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def logits_of(hf_model, x):
    with torch.no_grad():
        return hf_model.eval()(pixel_values=x).logits


def vistra_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_vit_directory_matches_huggingface(tmp_path, images):
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT))
    hf.save_pretrained(tmp_path)
    model = vistra.create_model("vit_tiny_patch16_224", depth=2, num_classes=5,
                                pretrained=tmp_path)
    torch.testing.assert_close(vistra_logits(model, images), logits_of(hf, images),
                               atol=1e-4, rtol=1e-4)


def test_weights_file_alone_loads_from_safetensors_and_bin(tmp_path, images):
    torch.manual_seed(1)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**VIT))
    hf.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    expected = logits_of(hf, images)
    for path in [tmp_path / "hf" / "model.safetensors", tmp_path / "pytorch_model.bin"]:
        model = vistra.create_model("vit_tiny_patch16_224", depth=2, num_classes=5)
        report = load_pretrained(model, path)
        assert report.layout == "HuggingFace ViT" and not report.changes
        torch.testing.assert_close(vistra_logits(model, images), expected, atol=1e-4, rtol=1e-4)


def test_deit_with_teacher_matches_huggingface(tmp_path, images):
    torch.manual_seed(2)
    hf = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**VIT))
    hf.save_pretrained(tmp_path)
    model = vistra.create_model("deit_tiny_distilled_patch16_224", depth=2, num_classes=5,
                                pretrained=tmp_path)
    torch.testing.assert_close(vistra_logits(model, images), logits_of(hf, images),
                               atol=1e-4, rtol=1e-4)


def test_swin_matches_huggingface(tmp_path, images):
    torch.manual_seed(3)
    config = transformers.SwinConfig(image_size=224, patch_size=4, embed_dim=96,
                                      depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24],
                                      window_size=7, layer_norm_eps=1e-5, num_labels=5)
    hf = transformers.SwinForImageClassification(config)
    hf.save_pretrained(tmp_path)
    model = vistra.create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2),
                                num_classes=5, pretrained=tmp_path)
    torch.testing.assert_close(vistra_logits(model, images), logits_of(hf, images),
                               atol=1e-4, rtol=1e-4)


def test_vit_model_pooler_is_the_21k_pre_logits_layer(tmp_path, images):
    torch.manual_seed(4)
    config = transformers.ViTConfig(**{**VIT, "hidden_size": 192})
    hf = transformers.ViTModel(config)  # the in21k layout: pooler = Linear + Tanh, no head
    hf.save_pretrained(tmp_path)
    model = vistra.create_model("vit_tiny_patch16_224", depth=2, representation_size=192,
                                num_classes=0, pretrained=tmp_path).eval()
    with torch.no_grad():
        pooled = hf.eval()(pixel_values=images).pooler_output
        torch.testing.assert_close(model(images), pooled, atol=1e-4, rtol=1e-4)
