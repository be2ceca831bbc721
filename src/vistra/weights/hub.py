"""Weights by name, from the local HuggingFace cache only: vistra never downloads.

A name is resolved to a HuggingFace repository:
  pretrained=True                    timm's default tag of the model (DEFAULT_TAGS)
  "vit_base_patch16_224.augreg2_in21k_ft_in1k" as the model name, or pretrained="augreg2_..."
                                     timm/<model>.<tag>
  "hf-hub:org/name" or "org/name"    that repository (timm's or transformers' layout)
and the repository to its snapshot in the cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), where `huggingface-cli download ORG/NAME` put it. Only
`huggingface_hub.try_to_load_from_cache` is called: a pure look-up on disk, so nothing here
opens a connection, with or without HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HF_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TAG = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")

# timm's default pretrained tag (the first listed in its default_cfgs) of each name vistra
# registers, read from timm/models/{vision_transformer,vision_transformer_hybrid,deit,
# swin_transformer}.py; the `_in21k` / `_in22k` names are timm's deprecated aliases, mapped
# as timm maps them. vit_huge_patch14_224 is left out: timm's default for it is untrained.
DEFAULT_TAGS = {
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "augreg2_in21k_ft_in1k",
    "vit_base_patch32_224": "augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",
    "vit_large_patch32_224": "orig_in21k",
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",
    "vit_base_patch32_384": "augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "augreg_in21k_ft_in1k",
    "vit_large_patch32_384": "orig_in21k_ft_in1k",
    "deit_tiny_patch16_224": "fb_in1k",
    "deit_small_patch16_224": "fb_in1k",
    "deit_base_patch16_224": "fb_in1k",
    "deit_tiny_distilled_patch16_224": "fb_in1k",
    "deit_small_distilled_patch16_224": "fb_in1k",
    "deit_base_distilled_patch16_224": "fb_in1k",
    "vit_base_r50_s16_224": "orig_in21k",
    "vit_base_r50_s16_384": "orig_in21k_ft_in1k",
    "swin_tiny_patch4_window7_224": "ms_in1k",
    "swin_small_patch4_window7_224": "ms_in22k_ft_in1k",
    "swin_base_patch4_window7_224": "ms_in22k_ft_in1k",
    "swin_large_patch4_window7_224": "ms_in22k_ft_in1k",
    "swin_base_patch4_window12_384": "ms_in22k_ft_in1k",
    "swin_large_patch4_window12_384": "ms_in22k_ft_in1k",
}
# vistra name -> timm's name and tag, for the names timm has deprecated.
TIMM_ALIASES = {
    "vit_base_patch16_224_in21k": ("vit_base_patch16_224", "augreg_in21k"),
    "vit_base_patch32_224_in21k": ("vit_base_patch32_224", "augreg_in21k"),
    "vit_large_patch16_224_in21k": ("vit_large_patch16_224", "augreg_in21k"),
    "vit_large_patch32_224_in21k": ("vit_large_patch32_224", "orig_in21k"),
    "vit_huge_patch14_224_in21k": ("vit_huge_patch14_224", "orig_in21k"),
    "vit_base_r50_s16_224_in21k": ("vit_base_r50_s16_224", "orig_in21k"),
    "swin_base_patch4_window7_224_in22k": ("swin_base_patch4_window7_224", "ms_in22k"),
    "swin_base_patch4_window12_384_in22k": ("swin_base_patch4_window12_384", "ms_in22k"),
    "swin_large_patch4_window7_224_in22k": ("swin_large_patch4_window7_224", "ms_in22k"),
    "swin_large_patch4_window12_384_in22k": ("swin_large_patch4_window12_384", "ms_in22k"),
}


def split_tag(name: str) -> tuple[str, str | None]:
    """"vit_base_patch16_224.augreg2_in21k_ft_in1k" -> (model name, tag); no tag: None."""
    base, dot, tag = name.partition(".")
    return (base, tag) if dot and tag else (name, None)


def is_tagged_model_name(name: str) -> bool:
    """Whether `name` is a registered model with a timm tag (and not a file of that name)."""
    from vistra.models import list_models

    base, tag = split_tag(name)
    return (tag is not None and bool(_TAG.fullmatch(tag)) and base in list_models()
            and not Path(name).exists())


def is_hub_name(name: str) -> bool:
    """Whether a model name is a HuggingFace repository ("hf-hub:org/name", "org/name")."""
    return name.startswith(HF_PREFIX) or bool(_REPO_ID.fullmatch(name))


def hub_repo(pretrained: str | os.PathLike | bool, model_name: str | None = None) -> str | None:
    """The HuggingFace repository `pretrained` names for `model_name` (which may carry a
    timm tag), or None when `pretrained` is a path (existing, or with a weights suffix)."""
    base, tag = split_tag(model_name) if model_name else (None, None)
    if pretrained is True:
        if base is None:
            raise ValueError("pretrained=True needs a model name to find its default weights")
        return _timm_repo(base, tag)
    if isinstance(pretrained, os.PathLike) or not isinstance(pretrained, str):
        return None
    if pretrained.startswith(HF_PREFIX):
        return pretrained[len(HF_PREFIX):]
    if Path(pretrained).exists() or pretrained.endswith(WEIGHT_SUFFIXES):
        return None
    if _REPO_ID.fullmatch(pretrained):
        return pretrained
    if base is not None and _TAG.fullmatch(pretrained):
        return _timm_repo(base, pretrained)
    return None


def default_repo(name: str) -> str | None:
    """The HuggingFace repository of `name`'s default weights (pretrained=True), if any."""
    timm_name, tag = TIMM_ALIASES.get(name, (name, None))
    tag = tag or DEFAULT_TAGS.get(timm_name)
    return f"timm/{timm_name}.{tag}" if tag else None


def _timm_repo(name: str, tag: str | None) -> str:
    if tag is not None:
        return f"timm/{TIMM_ALIASES.get(name, (name, None))[0]}.{tag}"
    repo = default_repo(name)
    if repo is None:
        raise ValueError(f"{name} has no default pretrained weights; name them with a tag "
                         f"(e.g. {name}.orig_in21k), a HuggingFace id or a file")
    return repo


def cache_dir() -> Path:
    """huggingface_hub's cache, as its environment variables set it now."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def snapshot(repo: str) -> Path:
    """The cached snapshot directory of `repo` holding its weights (refs/main's revision)."""
    from huggingface_hub import try_to_load_from_cache

    cache = cache_dir()
    for name in WEIGHT_FILES:
        found = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(found, str):
            return Path(found).parent
    folder = cache / f"models--{repo.replace('/', '--')}"
    raise FileNotFoundError(
        f"{repo} is not in the HuggingFace cache: expected {folder}/snapshots/<revision>/ "
        f"with {' or '.join(WEIGHT_FILES)} (and config.json). vistra does not download: on a "
        f"machine with network run `huggingface-cli download {repo}`, then copy {folder} "
        f"here (or set HF_HUB_CACHE to the cache that holds it)")
