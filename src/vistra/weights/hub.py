"""Weights by name, from the local HuggingFace cache only: vistra never downloads.

A name is resolved to a HuggingFace repository:
  pretrained=True                    timm's default tag of the model (its family's
                                     `timm_names`)
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

from vistra.models import families, list_models

HF_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TAG = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")


def split_tag(name: str) -> tuple[str, str | None]:
    """"vit_base_patch16_224.augreg2_in21k_ft_in1k" -> (model name, tag); no tag: None."""
    base, dot, tag = name.partition(".")
    return (base, tag) if dot and tag else (name, None)


def is_tagged_model_name(name: str) -> bool:
    """Whether `name` is a registered model with a timm tag (and not a file of that name)."""
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


def _timm_default(name: str) -> str | None:
    """timm's "name.tag" of the default weights of variant `name`, as its family lists it."""
    return next((f.timm_names[name] for f in families() if name in f.timm_names), None)


def default_repo(name: str) -> str | None:
    """The HuggingFace repository of `name`'s default weights (pretrained=True), if any."""
    found = _timm_default(name)
    return f"timm/{found}" if found else None


def _timm_repo(name: str, tag: str | None) -> str:
    if tag is not None:  # timm's name: an `_in21k` alias is timm's name without the suffix
        return f"timm/{split_tag(_timm_default(name) or name)[0]}.{tag}"
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
