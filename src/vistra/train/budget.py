"""A time budget for training: as many epochs as this machine's measured speed allows.

The number of epochs fixes where the cosine schedule ends, so it is chosen once the warmup is
over (the warmup does not depend on it) and chosen again after every later epoch, from the
median epoch time so far: one slow epoch (the first, say) does not cut the schedule short,
and a machine that stays slower (shared cores here drift by a third within a run) gets a
shorter one. A longer schedule needs three times the margin of keeping the current one, so
that a plan on the edge does not flip between two lengths, each flip moving the learning
rate. A machine that sped up may add epochs even after the last planned one: they run at the
end of the cosine (about lr * lrf), a gentle use of the time left.
"""

from __future__ import annotations

import math
import statistics

SAFETY = 0.05  # epochs to come are planned 5% longer than the median so far
GROW_SAFETY = 0.15  # ... and 15% longer for a plan to grow


def warmup_end(warmup_epochs: float) -> int:
    """The first epoch after which the schedule depends on the number of epochs."""
    return max(1, math.ceil(warmup_epochs))


def epochs_within(budget_seconds: float, elapsed_seconds: float, epoch_seconds: list[float],
                  most: int, safety: float = SAFETY) -> int:
    """The most epochs, at least those done (`epoch_seconds` has one entry each) and at most
    `most`, that end within the budget if each epoch to come takes the median time so far
    plus `safety`."""
    done = len(epoch_seconds)
    per_epoch = statistics.median(epoch_seconds) * (1 + safety)
    more = math.floor(max(budget_seconds - elapsed_seconds, 0.0) / per_epoch)
    return max(done, min(most, done + more))


def replan(budget_seconds: float, elapsed_seconds: float, epoch_seconds: list[float],
           planned: int, most: int) -> int:
    """The plan after an epoch: shorter if `planned` no longer fits with SAFETY, longer only
    if more fit with GROW_SAFETY, else unchanged."""
    fits = epochs_within(budget_seconds, elapsed_seconds, epoch_seconds, most)
    if fits < planned:
        return fits
    return max(planned, epochs_within(budget_seconds, elapsed_seconds, epoch_seconds, most,
                                      GROW_SAFETY))
