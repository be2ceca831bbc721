"""A time budget for training: as many epochs as this machine's measured speed allows.

The number of epochs fixes where the cosine schedule ends, so it is chosen once the warmup is
over (the warmup does not depend on it), from how long the last epoch took, and chosen again
after every later epoch: a machine that slows down (shared cores drift by a third within a
run here) gets a shorter schedule. Never a longer one: that would raise the learning rate
again, and a run that fitted its budget once already has the epochs it was promised.
"""

from __future__ import annotations

import math

SAFETY = 0.05  # epochs are planned 5% longer than the last one took


def warmup_end(warmup_epochs: float) -> int:
    """The first epoch after which the schedule depends on the number of epochs."""
    return max(1, math.ceil(warmup_epochs))


def epochs_within(budget_seconds: float, elapsed_seconds: float, done: int,
                  last_epoch_seconds: float, planned: int) -> int:
    """The most epochs, between `done` and `planned`, that end within the budget if each
    epoch to come takes as long as the last one (plus SAFETY)."""
    per_epoch = last_epoch_seconds * (1 + SAFETY)
    more = math.floor(max(budget_seconds - elapsed_seconds, 0.0) / per_epoch)
    return max(done, min(planned, done + more))
