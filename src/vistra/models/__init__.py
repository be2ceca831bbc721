"""The models: ViT / DeiT / R50 hybrid and Swin, registered under timm's names."""

from .layers import capture_attention
from .registry import DataConfig, ModelSpec, build_model, get_spec, list_models
from .swin import SwinConfig, SwinTransformer
from .vit import VisionTransformer, ViTConfig

__all__ = [
    "DataConfig", "ModelSpec", "SwinConfig", "SwinTransformer", "ViTConfig", "VisionTransformer",
    "build_model", "capture_attention", "get_spec", "list_models",
]
