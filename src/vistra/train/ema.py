"""An exponential moving average of the weights, which often validates better than the
weights themselves late in training, at the cost of one model copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """`module` holds the average; `update(model)` after every optimizer step.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n (as in
    TensorFlow's ExponentialMovingAverage), so that short runs are not dominated by the
    random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.module.state_dict().values(), model.state_dict().values(),
                            strict=True):
            if avg.is_floating_point():
                avg.lerp_(new.detach(), 1.0 - decay)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
