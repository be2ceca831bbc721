"""Untrusted weights: a file's few bytes of metadata or headers must not make vistra allocate
more than the file holds, and weights holding NaN or infinity are refused by name. Each
test failed on the code before its fix."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_evaluate import constant_checkpoint
from test_faults_inputs import needs_proc, run_with_memory_cap

import vistra
from vistra.weights import load_checkpoint, read_pretrained, save_checkpoint
from vistra.weights import read as weights_read


def with_metadata(src, dst, arch=None, data_config=None):
    """A copy of the checkpoint `src` whose metadata declares other architecture numbers."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    for key, changes in (("arch", arch), ("data_config", data_config)):
        meta[key] = json.dumps({**json.loads(meta[key]), **(changes or {})})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@needs_proc
def test_metadata_declaring_a_huge_model_is_refused_before_allocating(tmp_path):
    vit = constant_checkpoint(tmp_path / "vit.safetensors", ["a", "b"], "a")
    swin = tmp_path / "swin.safetensors"
    save_checkpoint(vistra.create_model("swin_tiny_patch4_window7_224", img_size=32,
                                        embed_dim=8, depths=(1, 1), num_heads=(1, 1),
                                        window_size=4, num_classes=2), swin)
    lies = {  # each would take from 5 GB to terabytes once built
        "wide": with_metadata(vit, tmp_path / "wide.safetensors", {"embed_dim": 20_000}),
        "deep": with_metadata(vit, tmp_path / "deep.safetensors", {"depth": 1_000_000}),
        "input": with_metadata(vit, tmp_path / "input.safetensors",
                               {"img_size": [200_000, 200_000]}),
        "crop": with_metadata(vit, tmp_path / "crop.safetensors",
                              data_config={"img_size": [100_000, 100_000]}),
        "window": with_metadata(swin, tmp_path / "window.safetensors",
                                {"window_size": 200, "img_size": [800, 800]}),
    }
    run_with_memory_cap(f"""
        from vistra.weights import load_checkpoint
        for name, path in {({k: str(v) for k, v in lies.items()})!r}.items():
            try:
                load_checkpoint(path)
            except ValueError as error:
                assert "was refused: its metadata declares" in str(error), (name, error)
            else:
                raise AssertionError(name + " loaded")
    """, imports="vistra.weights")


def test_metadata_of_the_wrong_shape_is_a_clear_error(tmp_path):
    vit = constant_checkpoint(tmp_path / "vit.safetensors", ["a", "b"], "a")
    with safe_open(str(vit), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(vit)), str(tmp_path / "bad.safetensors"),
              metadata={**meta, "arch": "[1, 2]"})
    with pytest.raises(ValueError, match="bad.safetensors has damaged vistra metadata"):
        load_checkpoint(tmp_path / "bad.safetensors")
    narrow = with_metadata(vit, tmp_path / "narrow.safetensors", {"embed_dim": 16})
    with pytest.raises(ValueError, match=r"narrow.safetensors was refused: .*tensor blocks.0."
                                         r"attn.proj.bias of shape \(16,\), but the file holds "
                                         r"\(32,\)"):
        load_checkpoint(narrow)


def npz_member(name: str, header_shape: tuple, payload: bytes) -> bytes:
    """The bytes of a .npz holding one .npy member whose header declares `header_shape`."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "<f4", "fortran_order": False, "shape": header_shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(name + ".npy", npy.getvalue() + payload)
    return out.getvalue()


def test_npz_header_declaring_a_huge_array_is_refused(tmp_path):
    path = tmp_path / "lie.npz"
    path.write_bytes(npz_member("Transformer/encoder_norm/scale", (10**6, 10**6), b"\0" * 16))
    with pytest.raises(ValueError, match=r"lie.npz was refused: .*declares a \(1000000, 1000000"):
        read_pretrained(path)


def test_npz_zip_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_read, "_NPZ_EXPANSION_ALLOWANCE", 1 << 20, raising=False)
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, zeros=np.zeros(1 << 20, np.float32))  # 4 MB in ~4 KB
    with pytest.raises(ValueError, match="bomb.npz was refused: .* would expand to 4,194,"):
        read_pretrained(path)


# --- NaN and infinity (item 13) ----------------------------------------------------------


def test_a_vistra_checkpoint_with_nan_is_refused_naming_the_tensor(tmp_path):
    path = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], "a")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["blocks.0.mlp.fc1.bias"][3] = float("nan")
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"m.safetensors: tensor blocks.0.mlp.fc1.bias holds 1 "
                                         r"NaN or infinite values"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_third_party_weights_with_infinity_are_refused_naming_the_tensor(tmp_path, suffix):
    state = vistra.create_model("vit_tiny_patch16_224", depth=1).state_dict()
    state["head.weight"][0, :2] = float("inf")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif suffix == ".pth":
        torch.save(state, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    with pytest.raises(ValueError, match=rf"w{suffix}: tensor head.weight holds 2 NaN"):
        read_pretrained(path)


def test_finite_weights_load_as_before(tmp_path):
    path = constant_checkpoint(tmp_path / "m.safetensors", ["a", "b"], "b")
    assert load_checkpoint(path).classes == ["a", "b"]


def test_metadata_naming_an_unknown_model_family_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "edited.safetensors"
    save_checkpoint(vistra.create_model("vit_fmnist", num_classes=3), path, classes=["a", "b", "c"])
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, "family": "nope", "model_name": "nope"})
    with pytest.raises(ValueError, match=r"edited\.safetensors was refused.*unknown model family"):
        load_checkpoint(path)
