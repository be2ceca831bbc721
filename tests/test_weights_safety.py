"""Nothing in a weights file can run code, and broken files give clear errors."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vistra
from vistra.weights import read_pretrained


class CreatesAFile:
    """Unpickling this calls open(target, 'w'): a stand-in for any code a pickle can run."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def model():
    return vistra.create_model("vit_tiny_patch16_224", depth=1)


@pytest.mark.parametrize("write", [
    lambda obj, path: torch.save({"model": {"head.weight": torch.zeros(1)}, "x": obj}, path),
    lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
], ids=["torch-zip", "torch-legacy", "plain-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, write):
    target = tmp_path / "pwned"
    write(CreatesAFile(target), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="was refused.*never runs code"):
        vistra.create_model("vit_tiny_patch16_224", depth=1, pretrained=tmp_path / "weights.pth")
    assert not target.exists()


def test_refusal_names_what_the_pickle_wanted(tmp_path):
    torch.save({"model": CreatesAFile(tmp_path / "pwned")}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"it refers to (io|builtins)\.open"):
        read_pretrained(tmp_path / "weights.pth")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "w.npz", cls=np.array([CreatesAFile(tmp_path / "pwned")], dtype=object))
    with pytest.raises(ValueError, match="refused: it holds Python objects"):
        read_pretrained(tmp_path / "w.npz")
    assert not (tmp_path / "pwned").exists()


def save_all_formats(tmp_path):
    state = {k: v for k, v in model().state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    save_file(state, tmp_path / "w.safetensors")
    np.savez(tmp_path / "w.npz", **{"Transformer/encoder_norm/scale": np.ones(4, np.float32)})
    return [tmp_path / n for n in ("w.pth", "w.safetensors", "w.npz")]


def test_truncated_files_are_reported_as_truncated_or_corrupt(tmp_path):
    for path in save_all_formats(tmp_path):
        data = path.read_bytes()
        for cut in (len(data) // 2, len(data) - 7):
            path.write_bytes(data[:cut])
            with pytest.raises(ValueError, match="truncated or corrupt"):
                read_pretrained(path)


def test_empty_random_and_missing_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_pretrained(tmp_path / "empty.pth")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a weights file vistra can read"):
        read_pretrained(tmp_path / "noise.bin")
    with pytest.raises(FileNotFoundError, match="missing.pth do not exist"):
        read_pretrained(tmp_path / "missing.pth")


def test_directory_without_weights_says_what_it_expected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors or pytorch_model.bin; found "
                                         "config.json"):
        read_pretrained(tmp_path)
