"""The default explain method chosen by measurement, per model: every method that applies
is scored on labelled images by the deletion curves, with the mean colour and with ROAD's
imputation (lower is better), and by insertion (higher is better), against the random
pixel order (faithfulness.py), and the most faithful is recorded in the model's card
(`ExplainChoice`), which `default_method` then follows.

The rule: each deletion AUC is taken as a multiple of the random order's on the same
images, and the method with the lowest mean of the two wins; methods within `TIE` of it
are told apart by insertion (the highest wins). Both deletion measures count because each
has its bias: mean-colour deletion favours maps whose removed pixels scatter (they leave a
texture no training image had), ROAD removes that and scores the information alone.

What `vistra explain --choose` and the end of `vistra train` run. The user's checkpoint is
an input and is never rewritten: --choose writes the record into a new file (`--save`);
training records it in its own best.safetensors. Either way the tensors are copied byte for
byte (`vistra.weights.save_explain_choice`).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from vistra.models import ExplainChoice
from vistra.weights import load_checkpoint, save_explain_choice

from . import default_method, explain_batch, methods_for
from .faithfulness import RANDOM, auc, curves, labelled_images, load_labelled

# Methods that draw something other than the evidence for a class, and so are not scored.
UNSCORED = {"window": "not scored: it draws one query position's attention weights, which "
                      "do not depend on the class explained"}
OUT_OF_TIME = "not scored: the time allowed ran out on the first image"
STEPS = 16  # pixel-removal steps of each curve: enough to rank methods, half the time of 32
TIE = 0.01  # mean relative deletion AUCs this close are a tie, broken by insertion
DELETIONS = ("deletion", "road")


def scored_methods(model: nn.Module) -> list[str]:
    """The methods that apply to the model and explain a class (not `UNSCORED`), its
    current default first (scored first, so it is scored whatever the time allowed)."""
    methods = [m for m in methods_for(model) if m not in UNSCORED]
    return sorted(methods, key=lambda m: m != default_method(model))


def skipped_methods(model: nn.Module, choice: ExplainChoice) -> dict[str, str]:
    """The methods that apply to the model but that `choice` did not score, with why."""
    return {m: UNSCORED.get(m, OUT_OF_TIME) for m in methods_for(model)
            if m not in choice.scores}


def relative_deletion(scores: dict[str, dict[str, float]], method: str) -> float:
    """The mean of the method's two deletion AUCs, each as a multiple of the random
    order's: below 1, the map finds the evidence faster than chance."""
    return statistics.fmean(scores[method][k] / max(scores[RANDOM][k], 1e-12)
                            for k in DELETIONS)


def most_faithful(scores: dict[str, dict[str, float]]) -> str:
    """The winner by the rule (module docstring) among the methods of `scores`."""
    methods = [m for m in scores if m != RANDOM]
    best = min(relative_deletion(scores, m) for m in methods)
    tied = [m for m in methods if relative_deletion(scores, m) <= best + TIE]
    return max(tied, key=lambda m: scores[m]["insertion"])


def choose_method(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, data: str,
                  by: str, methods: list[str] | None = None, steps: int = STEPS,
                  seconds: float | None = None, batch_size: int = 8,
                  seed: int = 0) -> ExplainChoice:
    """Score `methods` (default: `scored_methods`) and the random order on preprocessed
    images x [N, C, H, W] explained for their labels [N], and name the most faithful.

    With `seconds`, the first image is scored alone and the images after it in batches that
    fit in the time left, as measured on those done; where the time runs out within the
    first image, the methods not yet scored are left out (the first one and the random
    order always are). Every method is scored on the same images. `data` and `by` say, in
    the record, what was scored and by which command."""
    methods = list(methods or scored_methods(model))
    if not methods:
        raise ValueError(f"no explain method that can be scored applies to {model.name}")
    generator = torch.Generator().manual_seed(seed)
    sums = {m: {k: 0.0 for k in (*DELETIONS, "insertion")} for m in [*methods, RANDOM]}
    began, done = time.perf_counter(), 0
    while done < len(x):
        take = min(batch_size, len(x) - done)
        if seconds is not None:
            spent = time.perf_counter() - began
            take = 1 if done == 0 else min(take, int((seconds - spent) * done
                                                     / max(spent, 1e-9)))
            if take < 1:
                break
        xb, yb = x[done:done + take], labels[done:done + take]
        for method in list(sums):
            if (done == 0 and seconds is not None and method not in (methods[0], RANDOM)
                    and time.perf_counter() - began > seconds):
                del sums[method]
                continue
            if method == RANDOM:
                maps = torch.rand(take, *xb.shape[-2:], generator=generator)
            else:
                maps = explain_batch(model, xb, method, yb)[0]
            found = curves(model, xb, maps, yb, steps=steps, generator=generator, road=True)
            for measure, curve in (("deletion", found.deletion), ("road", found.road),
                                   ("insertion", found.insertion)):
                sums[method][measure] += float(auc(curve).sum())
        done += take
    scores = {m: {k: total / done for k, total in s.items()} for m, s in sums.items()}
    return ExplainChoice(most_faithful(scores), scores, done, data, steps, by)


def format_choice(choice: ExplainChoice, skipped: dict[str, str]) -> str:
    """The scores as a table, the choice and the rule, and the methods left out
    (`skipped_methods`)."""
    lines = [f"{choice.images} images of {choice.data}, {choice.steps} steps per curve",
             f"{'method':<14} {'ROAD deletion':>14} {'deletion':>9} {'insertion':>10} "
             f"{'both deletions vs random':>25}"]
    for method, s in choice.scores.items():
        relative = relative_deletion(choice.scores, method)
        mark = "  <- chosen" if method == choice.method else ""
        lines.append(f"{method:<14} {s['road']:>14.3f} {s['deletion']:>9.3f} "
                     f"{s['insertion']:>10.3f} {relative:>24.2f}x{mark}")
    lines.append(f"chosen: {choice.method}, the lowest mean of the two deletion AUCs as "
                 f"multiples of the random order's (within {TIE:g}: the highest insertion); "
                 "deletion: lower is better, insertion: higher is better")
    lines += [f"{method}: {why}" for method, why in skipped.items()]
    return "\n".join(lines)


def choose_for_folder(model: nn.Module, checkpoint: Path, data: Path, *, limit: int,
                      seconds: float | None = None, save: Path | None = None,
                      force: bool = False) -> ExplainChoice:
    """`vistra explain --choose`: the choice on up to `limit` labelled images of `data`,
    printed as a table, set on the model's card and, with `save`, written with the
    checkpoint's weights to that new file (the checkpoint itself is an input, never
    rewritten; an existing `save` only with `force`)."""
    if save is not None:
        if save.resolve() == checkpoint.resolve():
            raise ValueError(f"--save {save} is the checkpoint itself; vistra does not "
                             "rewrite its inputs: name a new file")
        if save.exists() and not force:
            raise ValueError(f"{save} already exists; use --force to replace it or choose "
                             "another --save")
    x, labels = load_labelled(model, data, limit)
    print(f"choosing the explain method: {', '.join(scored_methods(model))} on "
          f"{len(labels)} images of {data}", file=sys.stderr)
    choice = choose_method(model, x, labels, data=str(data), by="vistra explain --choose",
                           seconds=seconds)
    print(format_choice(choice, skipped_methods(model, choice)))
    model.card.explain = choice
    if save is None:
        print("not recorded: add --save FILE to write the checkpoint with this choice",
              file=sys.stderr)
    else:
        save_explain_choice(checkpoint, choice, save, overwrite=force)
        print(f"written {save}: {checkpoint}'s weights with {choice.method} recorded as the "
              "default explain method", file=sys.stderr)
    return choice


def choose_for_run(best: Path, samples: list[tuple[Path, int]], data: str, *, limit: int,
                   seconds: float, device: str | torch.device = "cpu") -> ExplainChoice:
    """The end of `vistra train`: the choice on up to `limit` of the run's validation
    `samples` (image path, class index) within about `seconds`, recorded in the run's own
    `best` checkpoint (rewritten atomically, the same tensor bytes)."""
    model = load_checkpoint(best, device=device).eval()
    x, labels = labelled_images(model, samples, limit)
    choice = choose_method(model, x, labels, data=data, by="vistra train", seconds=seconds)
    save_explain_choice(best, choice, best, overwrite=True)
    return choice
