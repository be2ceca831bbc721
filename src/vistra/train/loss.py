"""What a training step minimises: cross-entropy with the labels and, with a teacher, a
distillation term (Hinton et al. 2015; DeiT, Touvron et al. 2021).

  no teacher               CE(logits, labels); a distilled model's two heads both learn the
                           labels (the mean of their losses)
  teacher, distilled model (1 - alpha) * CE(class head, labels)
                             + alpha * teacher_loss(distillation head, teacher)
  teacher, other model     (1 - alpha) * CE(logits, labels) + alpha * teacher_loss(logits, teacher)

teacher_loss is, for "hard", CE with the teacher's top class (DeiT's hard distillation) and,
for "soft", KL(teacher || student) of the probabilities at temperature tau, times tau^2 so
that the gradients keep their size as tau changes. The KL is averaged over images (DeiT's
code also divides it by the number of classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .teacher import Teacher


@dataclass(frozen=True)
class Distillation:
    """How the student learns from the teacher: kind "hard" or "soft", the teacher's share
    alpha of the loss, the temperature tau of "soft"."""

    kind: str
    alpha: float
    tau: float


def teacher_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                 tau: float = 1.0) -> torch.Tensor:
    """The student's `logits` [B, K] against the teacher's: hard or soft (see the module)."""
    if kind == "hard":
        return F.cross_entropy(logits.float(), teacher_logits.argmax(1))
    if kind != "soft":
        raise ValueError(f"distillation must be hard or soft, got {kind!r}")
    return F.kl_div(F.log_softmax(logits.float() / tau, dim=1),
                    F.log_softmax(teacher_logits.float() / tau, dim=1),
                    reduction="batchmean", log_target=True) * tau * tau


def training_loss(output: torch.Tensor | tuple[torch.Tensor, ...], goal: torch.Tensor, *,
                  label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                  teacher_logits: torch.Tensor | None = None,
                  distillation: Distillation | None = None) -> torch.Tensor:
    """The loss of one batch (see the module). output: the model's logits, or a distilled
    model's (class head, distillation head) in training; goal: class indices, or target
    probabilities (mixup); class_weights: per class, for the label term only."""
    heads = output if isinstance(output, tuple) else (output,)

    def label_loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), goal, weight=class_weights,
                               label_smoothing=label_smoothing)

    if teacher_logits is None:
        return sum(label_loss(logits) for logits in heads) / len(heads)
    if distillation is None:
        raise ValueError("teacher logits given without the distillation settings")
    alpha = distillation.alpha
    return ((1 - alpha) * label_loss(heads[0])
            + alpha * teacher_loss(heads[-1], teacher_logits, distillation.kind,
                                   distillation.tau))


@dataclass
class Objective:
    """A run's loss settings besides label smoothing: per-class weights (balance "loss")
    and the teacher with its distillation settings, if any."""

    class_weights: torch.Tensor | None = None
    teacher: Teacher | None = None
    distillation: Distillation | None = None

    def loss(self, output: torch.Tensor | tuple[torch.Tensor, ...], goal: torch.Tensor,
             teacher_logits: torch.Tensor | None, smoothing: float) -> torch.Tensor:
        """training_loss with these settings and label smoothing `smoothing` (0 under
        mixup, whose targets come smoothed)."""
        return training_loss(output, goal, label_smoothing=smoothing,
                             class_weights=self.class_weights, teacher_logits=teacher_logits,
                             distillation=self.distillation)
