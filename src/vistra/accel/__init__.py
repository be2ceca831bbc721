"""CPU acceleration, kept out of the models: the capability probe (capabilities.py), the
inference versions of the models' modules applied by `optimize` (modules.py, inference.py) and
the training-safe attention (training.py). The only vistra code that knows the CPU or calls
private torch APIs (kernels.py)."""

from .capabilities import Capabilities, cpu_has_bf16, probe, resolve_dtype
from .inference import optimize
from .training import accelerate_training

__all__ = ["Capabilities", "accelerate_training", "cpu_has_bf16", "optimize", "probe",
           "resolve_dtype"]
