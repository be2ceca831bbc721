"""The models: ViT / DeiT / R50 hybrid and Swin, registered under timm's names, each family
declared once (family.py) and each model carrying its card (base.py)."""

from .base import DataConfig, ExplainChoice, FeatureExtractor, ModelCard, VistraModel
from .family import ModelFamily, TokenGeometry, families, get_family, register_family
from .layers import capture_attention
from .registry import ModelSpec, build_from_arch, build_model, get_spec, list_models, register
from .swin import SwinConfig, SwinTransformer
from .vit import DistilledLogits, VisionTransformer, ViTConfig

__all__ = [
    "DataConfig", "DistilledLogits", "ExplainChoice", "FeatureExtractor", "ModelCard",
    "ModelFamily", "ModelSpec",
    "SwinConfig", "SwinTransformer", "TokenGeometry", "ViTConfig", "VisionTransformer",
    "VistraModel",
    "build_from_arch", "build_model", "capture_attention", "families", "get_family",
    "get_spec", "list_models", "register", "register_family",
]
