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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups of the trainable parameters: with and without weight decay
    (norms and biases, being 1-D, and what the model names in `no_weight_decay()`)."""
    named = _model_no_decay(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in named else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
