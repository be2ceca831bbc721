"""vistra: Vision Transformers and Swin Transformers for image classification."""

# `vistra.explain` is the function (`vistra.explain(model, image)`); the package of the same
# name holds it with the rest: `from vistra.explain import overlay, Explanation, METHODS`.
from .accel import optimize
from .explain import explain
from .factory import create_model
from .models import DataConfig, ModelCard, capture_attention, list_models

__version__ = "0.1.0"
__all__ = ["DataConfig", "ModelCard", "capture_attention", "create_model", "explain",
           "list_models", "optimize", "__version__"]
