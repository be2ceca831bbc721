"""CPU acceleration, kept out of the models: the capability probe and the device and
precision choices of every command (capabilities.py), the inference versions of the models'
modules applied by `optimize` (modules.py, inference.py) and the training-safe attention
(training.py). The only vistra code that knows the CPU or calls private torch APIs
(kernels.py)."""

from .capabilities import (
    Capabilities,
    amp_dtype,
    cpu_has_bf16,
    default_device,
    describe_device,
    device_has_bf16,
    enable_tf32,
    has_tf32,
    probe,
    resolve_amp,
    resolve_device,
    resolve_dtype,
)
from .inference import optimize
from .training import accelerate_training

__all__ = ["Capabilities", "accelerate_training", "amp_dtype", "cpu_has_bf16", "default_device",
           "describe_device", "device_has_bf16", "enable_tf32", "has_tf32", "optimize", "probe",
           "resolve_amp", "resolve_device", "resolve_dtype"]
