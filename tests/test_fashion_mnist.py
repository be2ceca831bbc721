"""Fashion-MNIST: the IDX reader, the PNG export and the bundled demo folder."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from vistra.data.fashion_mnist import (
    DEFAULT_SOURCE,
    FASHION_MNIST_CLASSES,
    bundled_demo_dir,
    export_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)

needs_source = pytest.mark.skipif(
    not DEFAULT_SOURCE.is_dir(), reason="apt package dataset-fashion-mnist not installed"
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def test_read_idx_raw_and_gzipped(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "raw").write_bytes(idx_bytes(images))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(images)))
    assert np.array_equal(read_idx(tmp_path / "raw"), images)
    assert np.array_equal(read_idx(tmp_path / "packed.gz"), images)


def test_read_idx_big_endian_ints(tmp_path):
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "ints").write_bytes(idx_bytes(values, type_code=0x0C))
    assert read_idx(tmp_path / "ints").tolist() == [1, -2, 70000]


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="text is not an IDX file.*68 65 6c 6c"):
        read_idx(tmp_path / "text")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 5), np.uint8))[:-3])
    with pytest.raises(ValueError, match=r"short: header promises shape \(2, 5\)"):
        read_idx(tmp_path / "short")


def test_missing_source_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--source"):
        load_fashion_mnist("train", source=tmp_path)


@needs_source
def test_load_official_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_source
def test_export_small_balanced_subset(tmp_path):
    counts = export_fashion_mnist(tmp_path, per_class_train=3, per_class_test=2, seed=5)
    assert counts == {
        "train": dict.fromkeys(FASHION_MNIST_CLASSES, 3),
        "test": dict.fromkeys(FASHION_MNIST_CLASSES, 2),
    }
    for part, n in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (tmp_path / part).iterdir()) == sorted(FASHION_MNIST_CLASSES)
        for name in FASHION_MNIST_CLASSES:
            assert len(list((tmp_path / part / name).glob("*.png"))) == n

    # Each PNG is the official image at the index in its name, under its official label.
    images, labels = load_fashion_mnist("test")
    for path in (tmp_path / "test").rglob("*.png"):
        index = int(path.stem)
        assert FASHION_MNIST_CLASSES[labels[index]] == path.parent.name
        assert np.array_equal(np.asarray(Image.open(path)), images[index])

    with pytest.raises(FileExistsError, match="already holds files"):
        export_fashion_mnist(tmp_path, per_class_train=3, per_class_test=2)


def test_bundled_demo_has_ten_balanced_classes():
    root = bundled_demo_dir()
    for part, n in (("train", 250), ("test", 50)):
        folders = sorted(p.name for p in (root / part).iterdir())
        assert folders == sorted(FASHION_MNIST_CLASSES)
        assert all(len(list((root / part / f).glob("*.png"))) == n for f in folders)
    assert Image.open(next((root / "train" / "Bag").glob("*.png"))).size == (28, 28)


@needs_source
def test_bundled_demo_comes_from_the_official_splits():
    root = bundled_demo_dir()
    for part in ("train", "test"):
        images, labels = load_fashion_mnist(part)
        for folder in sorted((root / part).iterdir()):
            path = min(folder.glob("*.png"))
            index = int(path.stem)
            assert FASHION_MNIST_CLASSES[labels[index]] == folder.name
            assert np.array_equal(np.asarray(Image.open(path)), images[index])
