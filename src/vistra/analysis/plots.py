"""Pictures of a run: training curves and confusion matrices, as PNG files.

matplotlib's Figure is used directly (no pyplot), so nothing opens a window or touches global
state, and it is imported inside each function because it is slow to import.
"""

from __future__ import annotations

import os

import numpy as np


def plot_training_curves(history: list[dict], png_path: str | os.PathLike) -> None:
    """Loss, accuracy and learning rate per epoch from metrics.jsonl records."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    curves = [("train_acc", "train", "o-"), ("val_top1", "validation top-1", "o-"),
              ("val_top5", "validation top-5", "o-"),
              ("ema_val_top1", "EMA validation top-1", "s--")]  # dashed: often on top of top-1
    for key, label, style in curves:
        if key in history[0]:
            acc_ax.plot(epochs, [100 * h[key] for h in history], style, label=label)
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="%", ylim=(0, 101))
    lr_ax.plot(epochs, [h["lr"] for h in history], "o-")
    lr_ax.set(title="Learning rate (end of epoch)", xlabel="epoch")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.legend()
    acc_ax.legend(loc="lower right")
    fig.savefig(png_path, dpi=110)


def plot_confusion_matrix(confusion: list[list[int]] | np.ndarray, classes: list[str],
                          png_path: str | os.PathLike, title: str = "Confusion matrix") -> None:
    """Rows are true classes, columns predictions; colour is the share of the true class
    (so small classes stay visible), the numbers are image counts."""
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(classes)
    side = min(max(4.5, 0.55 * k + 2.5), 30)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if k <= 30:
        for (row, col), n in np.ndenumerate(counts):
            if n:
                ax.text(col, row, str(n), ha="center", va="center", fontsize=8,
                        color="white" if shares[row, col] > 0.5 else "black")
    ticks = np.arange(k)
    ax.set_xticks(ticks, classes, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.savefig(png_path, dpi=110)
