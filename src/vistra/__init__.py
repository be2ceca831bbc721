"""vistra: Vision Transformers and Swin Transformers for image classification."""

from .factory import create_model
from .models import DataConfig, ModelCard, capture_attention, list_models

__version__ = "0.1.0"
__all__ = ["DataConfig", "ModelCard", "capture_attention", "create_model", "list_models",
           "__version__"]
