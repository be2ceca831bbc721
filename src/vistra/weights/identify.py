"""Which registered model a state dict (in vistra's layout) most likely belongs to, read from
its tensor shapes: what a mismatch error tells the user to pick instead."""

from __future__ import annotations

from dataclasses import fields

from vistra.models import families, get_family, get_spec, list_models

from .keymap import Tensors


def architecture_facts(state: Tensors) -> dict | None:
    """The family, embed_dim, depth(s), patch or window size... as far as the shapes tell
    (each family's `weight_facts`), or None when no family knows the keys."""
    for family in families():
        if family.weight_facts is None:
            continue
        try:
            facts = family.weight_facts(state)
        except (KeyError, IndexError, ValueError):  # keys or shapes of something else
            continue
        if facts is not None:
            return {"family": family.name, **facts}
    return None


def likely_models(facts: dict) -> tuple[list[str], list[str]]:
    """Registered names of the same family and width as `facts`, best first (ties: all of
    them), and the structural facts in which they differ (empty for an exact match)."""
    structure = get_family(facts["family"]).structure_facts
    scored = []
    for name in list_models():
        spec = get_spec(name)
        same_width = getattr(spec.arch, "embed_dim", None) == facts.get("embed_dim")
        if spec.family != facts["family"] or not same_width:
            continue
        arch = {f.name: getattr(spec.arch, f.name) for f in fields(spec.arch)}
        arch["img_size"] = spec.data.img_size
        shared = [k for k in facts if k in arch]
        differ = [k for k in shared if k in structure and arch[k] != facts[k]]
        scored.append(((-len(differ), sum(arch[k] == facts[k] for k in shared)), name, differ))
    if not scored:
        return [], []
    best, _, differ = max(scored)
    return [name for score, name, _ in scored if score == best], differ


def describe_facts(facts: dict) -> str:
    """'a ViT with embed_dim 384, depth 12, ...' for an error message."""
    parts = []
    for key, value in facts.items():
        if key == "family" or value in (None, False):
            continue
        if isinstance(value, tuple):
            value = ("x" if key == "img_size" else "-").join(map(str, value))
        parts.append(f"{key} {value}")
    return f"a {get_family(facts['family']).label} with " + ", ".join(parts)
