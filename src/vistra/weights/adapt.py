"""Fitting a state dict (already in vistra's layout) to the model it is loaded into.

What may differ, and is adapted and reported: the classifier (another class count, or a
pre-logits layer on one side only), the image size (ViT position embeddings resampled), the
window size (Swin relative position bias tables interpolated), and buffers other libraries
save that vistra recomputes. Anything else that does not fit is an error that lists the keys
and names the model the file most likely belongs to.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from vistra.models.resample import resample_pos_embed, resize_rel_pos_bias_table

from .identify import architecture_facts, describe_facts, likely_models
from .keymap import Tensors

RUNTIME_BUFFERS = ("relative_position_index", "attn_mask")
HEADS = {"head.": "head", "head_dist.": "distillation head"}


@dataclass
class Fitted:
    """A complete state dict for the model: every key from the file, adapted, or (for the
    classifier only) from the model's fresh initialisation."""

    state: Tensors
    loaded: int  # tensors taken from the file
    reinitialised: list[str] = field(default_factory=list)  # model keys left at fresh init
    dropped: list[str] = field(default_factory=list)  # file keys not used
    changes: list[str] = field(default_factory=list)  # adaptations, in words
    notes: list[str] = field(default_factory=list)  # harmless differences, in words


def fit_to_model(model: nn.Module, source: Tensors, origin: str) -> Fitted:
    """Adapt `source` to `model.state_dict()`; `origin` (the file) is named in errors."""
    target = model.state_dict()
    state = dict(source)
    fitted = Fitted(state, 0)
    _drop_runtime_buffers(fitted, target)
    _resample_pos_embed(model, fitted, target)
    _resize_bias_tables(fitted, target)
    _fit_classifier(fitted, target)
    _check_fits(model, fitted, target, source, origin)
    fitted.loaded = len(state)
    state.update({k: target[k] for k in fitted.reinitialised})
    return fitted


def _drop_runtime_buffers(fitted: Fitted, target: Tensors) -> None:
    names = [k for k in fitted.state
             if k.rsplit(".", 1)[-1] in RUNTIME_BUFFERS and k not in target]
    for k in names:
        del fitted.state[k]
    fitted.dropped += names
    if names:
        kinds = sorted({k.rsplit(".", 1)[-1] for k in names})
        fitted.notes.append(f"left out {len(names)} saved buffers ({', '.join(kinds)}): "
                            f"vistra recomputes them at run time")


def _resample_pos_embed(model: nn.Module, fitted: Fitted, target: Tensors) -> None:
    src, dst = fitted.state.get("pos_embed"), target.get("pos_embed")
    if src is None or dst is None or src.shape == dst.shape or src.shape[-1] != dst.shape[-1]:
        return
    prefix = model.num_prefix_tokens
    if 1 + ("dist_token" in fitted.state) != prefix:
        return  # distilled on one side only: another model, which the key check reports
    tokens = src.shape[1] - prefix
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"the position embedding in the file has {tokens} grid tokens, not a "
                         f"square grid, so its image size is unknown; create the model at the "
                         f"size the weights were trained at")
    fitted.state["pos_embed"] = resample_pos_embed(src, model.grid_size, prefix, (side, side))
    h, w = model.grid_size
    fitted.changes.append(f"position embedding resampled from a {side}x{side} grid to {h}x{w} "
                          f"(bicubic; class token{'s' if prefix > 1 else ''} kept)")


def _resize_bias_tables(fitted: Fitted, target: Tensors) -> None:
    resized: Counter = Counter()
    for key, table in fitted.state.items():
        want = target.get(key)
        if (key.endswith("relative_position_bias_table") and want is not None
                and table.shape != want.shape and table.shape[1] == want.shape[1]):
            new_side = math.isqrt(want.shape[0])
            fitted.state[key] = resize_rel_pos_bias_table(table, (new_side + 1) // 2)
            resized[math.isqrt(table.shape[0]), new_side] += 1
    for (old, new), n in sorted(resized.items()):
        fitted.changes.append(f"{n} relative position bias tables interpolated from {old}x{old} "
                              f"to {new}x{new} (bicubic; centre kept)")


def _keys(state: Tensors, prefix: str) -> list[str]:
    return sorted(k for k in state if k.startswith(prefix))


def _fits(state: Tensors, target: Tensors, prefix: str) -> bool:
    """The model has this part and the file holds exactly it, with the same shapes."""
    want = _keys(target, prefix)
    return (bool(want) and _keys(state, prefix) == want
            and all(state[k].shape == target[k].shape for k in want))


def _classes(state: Tensors, prefix: str) -> int:
    weight = state.get(prefix + "weight")
    return 0 if weight is None else weight.shape[0]


def _replace(fitted: Fitted, target: Tensors, prefix: str) -> None:
    for k in _keys(fitted.state, prefix):
        del fitted.state[k]
        fitted.dropped.append(k)
    fitted.reinitialised += _keys(target, prefix)


def _fit_classifier(fitted: Fitted, target: Tensors) -> None:
    """Keep what of pre-logits and heads fits; the rest is dropped / freshly initialised."""
    state = fitted.state
    has_pre = bool(_keys(state, "pre_logits.")), bool(_keys(target, "pre_logits."))
    pre_kept = _fits(state, target, "pre_logits.")
    if any(has_pre) and not pre_kept:
        _replace(fitted, target, "pre_logits.")
        if not has_pre[1]:
            fitted.changes.append("pre-logits layer dropped: the model has none")
        elif has_pre[0]:
            fitted.changes.append("pre-logits layer initialised fresh: the file's has another "
                                  "size")
        else:
            fitted.changes.append("pre-logits layer initialised fresh: the file has none "
                                  "(create the model with representation_size=None to keep "
                                  "the file's head)")
    # A head reads the pre-logits output when there is one, so it is kept only if what feeds
    # it comes from the file as well.
    same_features = pre_kept or not any(has_pre)
    for prefix, name in HEADS.items():
        if not (_keys(state, prefix) or _keys(target, prefix)):
            continue
        if same_features and _fits(state, target, prefix):
            continue
        n_file, n_model = _classes(state, prefix), _classes(target, prefix)
        _replace(fitted, target, prefix)
        if n_model == 0:
            fitted.changes.append(f"{name} of {n_file} classes dropped: the model has none "
                                  f"(it returns features)")
        elif n_file == n_model:
            fitted.changes.append(f"{name} initialised fresh: the pre-logits layer before it "
                                  f"changed")
        else:
            had = f"the file's has {n_file}" if n_file else "the file has none"
            fitted.changes.append(f"{name} initialised fresh for {n_model} classes ({had})")


def _listing(label: str, items: list[str], sep: str = ", ", limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {label} ({len(items)}): {sep.join(items[:limit])}{more}"


def _check_fits(model: nn.Module, fitted: Fitted, target: Tensors, source: Tensors,
                origin: str) -> None:
    state = fitted.state
    missing = [k for k in target if k not in state and k not in fitted.reinitialised]
    unexpected = [k for k in state if k not in target]
    reshaped = [f"{k} {tuple(state[k].shape)} in the file, {tuple(target[k].shape)} in the model"
                for k in state if k in target and state[k].shape != target[k].shape]
    if not (missing or unexpected or reshaped):
        return
    name = getattr(model, "name", type(model).__name__)
    message = f"the weights in {origin} do not fit {name}. {_suggestion(source)}"
    for label, items, sep in [("missing in the file", missing, ", "),
                              ("not in the model", unexpected, ", "),
                              ("different shapes", reshaped, "; ")]:
        if items:
            message += _listing(label, items, sep)
    raise ValueError(message)


def _suggestion(source: Tensors) -> str:
    facts = architecture_facts(source)
    if facts is None:
        return "The file's keys are not those of a ViT or Swin that vistra knows."
    holds = f"The file holds {describe_facts(facts)}"
    names, differ = likely_models(facts)
    if not names:
        return f"{holds}; no registered model has this width (see `vistra models`)."
    if differ:
        return (f"{holds}; closest registered model: {' or '.join(names[:3])}, created with "
                f"overrides for {', '.join(differ)}.")
    return f"{holds}: most likely {' or '.join(names[:3])}; create that model and load again."
