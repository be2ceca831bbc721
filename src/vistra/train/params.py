"""Which parameters train, and which of them get weight decay.

Decaying a LayerNorm gain, a bias, the class/distillation tokens, the position embedding or
Swin's relative position bias table pulls them towards zero for no benefit (they are not
weights of a linear map whose norm should stay small), so, as in timm and the official Swin
code, they go into a group without weight decay.
"""

from __future__ import annotations

from torch import nn

NO_DECAY_NAMES = ("cls_token", "dist_token", "pos_embed", "relative_position_bias_table")
HEAD_MODULES = ("head", "head_dist", "pre_logits")


def _model_no_decay(model: nn.Module) -> set[str]:
    """The names the model declares (timm's `no_weight_decay()`); for a model without the
    method, the parameters named like the token / position / bias-table ones."""
    if hasattr(model, "no_weight_decay"):
        return set(model.no_weight_decay())
    return {name for name, _ in model.named_parameters()
            if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES}


def param_groups(model: nn.Module, weight_decay: float,
                 layer_decay: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters: with and without weight decay (norms
    and biases, being 1-D, and what the model names in `no_weight_decay()`).

    With `layer_decay`, each of these is split by the model's layers (`layer_ids()`), and
    each group carries `lr_scale` = layer_decay ** (top layer - its layer) (BEiT): 1 for the
    head, the decay once for the last block, ..., the lowest for the embeddings. Each group
    names its parameters in `names`, so the split can be shown and checked."""
    named = _model_no_decay(model)
    layers = model.layer_ids() if layer_decay is not None else {}
    top = max(layers.values(), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name in named)
        layer = layers.get(name, top)
        group = groups.setdefault((layer, decays), {
            "params": [], "names": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": 1.0 if layer_decay is None else layer_decay ** (top - layer)})
        group["params"].append(param)
        group["names"].append(name)
    if layer_decay is None:  # the two groups, even when one is empty
        return [groups.get((top, flag), {"params": [], "names": [], "lr_scale": 1.0,
                                         "weight_decay": weight_decay if flag else 0.0})
                for flag in (True, False)]
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def describe_layer_decay(groups: list[dict], layer_decay: float) -> str:
    """The learning-rate scale of each layer's parameters, top first, for the run's log."""
    scales: dict[float, list[str]] = {}
    for group in groups:
        for name in group["names"]:
            parts = name.split(".")
            # blocks.3.attn.qkv.weight -> blocks.3; layers.1.blocks.0... -> layers.1.blocks.0
            keep = {"blocks": 2, "layers": 4 if parts[2:3] == ["blocks"] else 3}.get(parts[0], 1)
            where = ".".join(parts[:keep])
            names = scales.setdefault(group["lr_scale"], [])
            if where not in names:
                names.append(where)
    lines = [f"layer decay {layer_decay:g}: learning rate = lr x scale"]
    lines += [f"  x{scale:.4g}  {', '.join(sorted(names))}"
              for scale, names in sorted(scales.items(), reverse=True)]
    return "\n".join(lines)


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Freeze everything except the classifier head(s) and pre-logits; return what trains.

    The usual transfer-learning shortcut: the pretrained features stay as they are and only
    the new classifier learns, which is fast and needs few images.
    """
    heads = getattr(model, "head_modules", HEAD_MODULES)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".", 1)[0] in heads
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"{getattr(model, 'name', type(model).__name__)} has no head to train "
                         "(was it built with num_classes=0?)")
    return trainable
