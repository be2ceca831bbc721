"""CPU acceleration, kept out of the models: the capability probe (capabilities.py), the
inference versions of the models' modules applied by `optimize` (modules.py, optimize.py) and
the training-safe attention (training.py). The only vistra code that knows the CPU or calls
private torch APIs (kernels.py)."""

from .capabilities import Capabilities, capabilities, cpu_has_bf16, resolve_dtype
from .optimize import optimize
from .training import accelerate_training

__all__ = ["Capabilities", "accelerate_training", "capabilities", "cpu_has_bf16", "optimize",
           "resolve_dtype"]
