"""AttnLRP (Achtibat et al., ICML 2024, "AttnLRP: Attention-aware layer-wise relevance
propagation for transformers") for ViT, DeiT, the R50 hybrid and Swin, in one forward and
one backward.

The efficient formulation of the authors' library lxt: relevance at a tensor t is t * dS/dt,
S the target's logit, where the backward of a few operations is replaced by the LRP rule's.
The rules (the paper's numbering):

- linear layers, convolutions, additions (residuals, position embeddings), pooling by mean:
  their plain gradient, which times the input is the epsilon rule (eq. 8) with epsilon -> 0
  and the bias in the denominator, so a bias keeps its share;
- LayerNorm, and the R50 hybrid's GroupNorm: the identity rule on the division by the
  standard deviation (Prop. 3.4), i.e. the std is a constant in the backward; the mean
  subtraction and the affine part are linear;
- GELU, and the tanh of the pre-logits layer: the identity rule (eq. 9), backward
  f(x) / x instead of f'(x);
- softmax: its plain gradient, which times its input is the paper's rule x (R - s sum R)
  (Prop. 3.1, Taylor decomposition at x with the bias); the rule does not conserve;
- q k^T and A v, products of two activations: the uniform rule after the epsilon rule
  (Prop. 3.3), each operand half of each product's relevance: the gradients into q and k
  are divided by 4 (two products on their way), into v by 2 (lxt's `divide_gradient`).
  Scale, relative position bias, Swin's shift mask and the fused kernel change nothing:
  the backward through them stays exact;
- window shift, padding, partition, patch merging's reordering: index operations, whose
  gradient moves the relevance back to where it came from.

The stem (the patch conv, vit_fmnist's and swin_fmnist's conv-BatchNorm-ReLU layers, the
R50 hybrid's ResNet) gets the same rules, so the map is at the input's pixels: convolutions
and BatchNorm in evaluation (an affine map, folded into its conv) the epsilon rule, ReLU the
identity rule (its gradient already), max-pool the winner takes all. lxt's rules for
torchvision's ViT leave its patch conv so too; the z+ / gamma rules would smooth a deep
stem's map but favour positive evidence by construction, and relevance would no longer be
the model's own linearisation. The map is the relevance summed over the input channels,
signed: the model's evidence for the class (> 0) and against it (< 0).

The rules hold only inside `attnlrp_rules`, which sets instance attributes (`forward` of
the norms and activations, `split` of each attention module) and removes them after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from vistra.models.layers import Attention
from vistra.models.vit import PreLogits


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies by `factor` (lxt's divide_gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    """y = f(x) elementwise, with f(x) / x in place of f'(x): the relevance x * dS/dx equals
    y * dS/dy, all of it passed to the input (0 where x is 0)."""

    @staticmethod
    def forward(ctx, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                ) -> torch.Tensor:
        y = fn(x)
        ctx.save_for_backward(torch.where(x == 0, 0.0, y / x))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio


def _identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                   ) -> torch.Tensor:
    return _IdentityRule.apply(fn, x)


def _normalise_with_constant_std(x: torch.Tensor, dims: tuple[int, ...], eps: float
                                 ) -> torch.Tensor:
    centred = x - x.mean(dims, keepdim=True)
    std = (centred.pow(2).mean(dims, keepdim=True) + eps).sqrt()
    return centred / std.detach()


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(-len(module.normalized_shape), 0))
    y = _normalise_with_constant_std(x, dims, module.eps)
    if module.weight is not None:
        y = y * module.weight
    return y if module.bias is None else y + module.bias


def _group_norm(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    groups = x.reshape(x.shape[0], module.num_groups, -1)
    y = _normalise_with_constant_std(groups, (-1,), module.eps).reshape(x.shape)
    if module.weight is None:
        return y
    affine = (1, -1) + (1,) * (x.ndim - 2)
    return y * module.weight.view(affine) + module.bias.view(affine)


def _pre_logits(module: PreLogits, x: torch.Tensor) -> torch.Tensor:
    return _identity_rule(torch.tanh, module.fc(x))


def _uniform_split(split: Callable, qkv: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = split(qkv)
    return (_ScaleGradient.apply(q, 0.25), _ScaleGradient.apply(k, 0.25),
            _ScaleGradient.apply(v, 0.5))


def _rule(module: nn.Module) -> tuple[str, Callable] | None:
    """(the attribute to replace, its replacement) for a module with an LRP rule."""
    if isinstance(module, nn.LayerNorm):
        return "forward", partial(_layer_norm, module)
    if isinstance(module, nn.GroupNorm):
        return "forward", partial(_group_norm, module)
    if isinstance(module, (nn.GELU, nn.Tanh)):
        return "forward", partial(_identity_rule, module.forward)
    if isinstance(module, PreLogits):
        return "forward", partial(_pre_logits, module)
    if isinstance(module, Attention):
        return "split", partial(_uniform_split, module.split)
    return None


_ABSENT = object()


@contextlib.contextmanager
def attnlrp_rules(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's gradient times its input is AttnLRP's relevance; after
    it, the modules are as they were."""
    replaced = []
    try:
        for module in model.modules():
            rule = _rule(module)
            if rule is not None:
                name, replacement = rule
                replaced.append((module, name, module.__dict__.get(name, _ABSENT)))
                setattr(module, name, replacement)
        yield
    finally:
        for module, name, before in reversed(replaced):
            if before is _ABSENT:
                delattr(module, name)
            else:
                setattr(module, name, before)


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnLRP's relevance of each input value for the target's logit.

    x [B, C, H, W], target [B] or None (the predicted class) -> (relevance [B, C, H, W],
    logits [B, K])."""
    x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
    with torch.enable_grad(), attnlrp_rules(model):
        logits = model(x)
    if target is None:
        target = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return (x * grad).detach(), logits.detach()


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The AttnLRP map: relevance summed over the input's channels, signed.

    x [B, C, H, W], target [B] or None (the predicted class) -> (map [B, H, W], logits)."""
    pixels, logits = relevance(model, x, target)
    return pixels.sum(1), logits
