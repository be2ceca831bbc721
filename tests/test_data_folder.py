"""Scanning a class-per-folder dataset: classes, a reproducible split, skipped files."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vistra.data.folder import (
    ImageFolderDataset,
    class_counts,
    format_class_counts,
    plot_class_counts,
    read_class_indices,
    scan_image_folder,
    write_class_indices,
)


def _write_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def make_folder(root, counts, order_seed=None):
    """root/<class>/<i>.png for {class: count}; creation order shuffled when seeded."""
    files = [root / name / f"{i:03d}.png" for name, n in counts.items() for i in range(n)]
    if order_seed is not None:
        random.Random(order_seed).shuffle(files)
    for path in files:
        _write_png(path, value=int(path.stem))
    return root


def relative(samples, root):
    return [(path.relative_to(root).as_posix(), label) for path, label in samples]


COUNTS = {"cat": 20, "dog": 10, "emu": 5}


def test_classes_are_sorted_folder_names(tmp_path):
    split = scan_image_folder(make_folder(tmp_path, {"zebra": 3, "ant": 3, "moth": 3}))
    assert split.classes == ["ant", "moth", "zebra"]
    assert split.split_source == "random"
    assert {label for _, label in split.train + split.val} == {0, 1, 2}
    assert all(path.parent.name == split.classes[label] for path, label in split.train)


def test_split_is_reproducible_disjoint_and_complete(tmp_path):
    root = make_folder(tmp_path, COUNTS)
    first, second = scan_image_folder(root, seed=3), scan_image_folder(root, seed=3)
    assert (first.train, first.val) == (second.train, second.val)
    train, val = {p for p, _ in first.train}, {p for p, _ in first.val}
    assert not train & val
    assert train | val == set(root.rglob("*.png"))
    assert scan_image_folder(root, seed=4).val != first.val


def test_split_does_not_depend_on_creation_order(tmp_path):
    a = scan_image_folder(make_folder(tmp_path / "a", COUNTS, order_seed=1))
    b = scan_image_folder(make_folder(tmp_path / "b", COUNTS, order_seed=2))
    assert relative(a.val, tmp_path / "a") == relative(b.val, tmp_path / "b")
    assert relative(a.train, tmp_path / "a") == relative(b.train, tmp_path / "b")


def test_each_class_gives_its_share_to_validation(tmp_path):
    split = scan_image_folder(make_folder(tmp_path, {**COUNTS, "fly": 2}), val_fraction=0.2)
    counts = class_counts(split)
    assert counts == {
        "cat": {"train": 16, "val": 4},
        "dog": {"train": 8, "val": 2},
        "emu": {"train": 4, "val": 1},
        "fly": {"train": 1, "val": 1},  # at least one on each side
    }


def test_no_validation_when_fraction_is_zero(tmp_path):
    split = scan_image_folder(make_folder(tmp_path, COUNTS), val_fraction=0)
    assert split.val == [] and len(split.train) == 35


def test_bad_files_are_skipped_with_reasons(tmp_path):
    root = make_folder(tmp_path, {"cat": 4, "dog": 4})
    (root / "cat" / "notes.txt").write_text("not a picture")
    (root / "cat" / "noise.png").write_bytes(np.random.default_rng(0).bytes(200))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "dog" / "cut.jpg")
    data = (root / "dog" / "cut.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()

    split = scan_image_folder(root)
    reasons = {path.name: reason for path, reason in split.skipped}
    assert reasons == {
        "notes.txt": "not an image file type",
        "noise.png": "not an image",
        "cut.jpg": "truncated",
    }
    assert split.classes == ["cat", "dog"] and len(split.train) + len(split.val) == 8


def test_train_and_val_folders_are_used_as_given(tmp_path):
    make_folder(tmp_path / "train", {"cat": 3, "dog": 2, "emu": 2})
    make_folder(tmp_path / "test", {"cat": 1, "dog": 2})  # emu missing from test: fine
    split = scan_image_folder(tmp_path)
    assert split.split_source == "folders"
    assert split.classes == ["cat", "dog", "emu"]
    assert relative(split.train, tmp_path) == [
        ("train/cat/000.png", 0),
        ("train/cat/001.png", 0),
        ("train/cat/002.png", 0),
        ("train/dog/000.png", 1),
        ("train/dog/001.png", 1),
        ("train/emu/000.png", 2),
        ("train/emu/001.png", 2),
    ]
    assert relative(split.val, tmp_path) == [
        ("test/cat/000.png", 0),
        ("test/dog/000.png", 1),
        ("test/dog/001.png", 1),
    ]


def test_unusable_folders_raise_naming_the_folder(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(tmp_path)

    make_folder(tmp_path / "one", {"cat": 3})
    with pytest.raises(ValueError, match="single class.*cat"):
        scan_image_folder(tmp_path / "one")

    make_folder(tmp_path / "empty", {"cat": 3})
    (tmp_path / "empty" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"empty[/\\]dog has no valid images"):
        scan_image_folder(tmp_path / "empty")

    make_folder(tmp_path / "broken", {"cat": 3})
    (tmp_path / "broken" / "dog").mkdir()
    (tmp_path / "broken" / "dog" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"broken[/\\]dog has no valid images.*a.jpg"):
        scan_image_folder(tmp_path / "broken")


def test_class_indices_round_trip(tmp_path):
    path = tmp_path / "run" / "class_indices.json"
    write_class_indices(["daisy", "rose", "tulip"], path)
    assert path.read_text().startswith('{\n  "0": "daisy"')
    assert read_class_indices(path) == ["daisy", "rose", "tulip"]
    path.write_text('{"0": "a", "2": "b"}')
    with pytest.raises(ValueError, match="class_indices.json"):
        read_class_indices(path)


def test_counts_table_and_chart(tmp_path):
    split = scan_image_folder(make_folder(tmp_path / "data", COUNTS))
    table = format_class_counts(split)
    assert table.splitlines()[0].split() == ["class", "train", "val"]
    assert table.splitlines()[1].split() == ["cat", "16", "4"]
    assert table.splitlines()[-1].split() == ["total", "28", "7"]
    plot_class_counts(split, tmp_path / "counts.png")
    assert Image.open(tmp_path / "counts.png").size[0] > 300


def test_dataset_yields_transformed_images_and_names_broken_files(tmp_path):
    split = scan_image_folder(make_folder(tmp_path, {"cat": 2, "dog": 2}), val_fraction=0)
    dataset = ImageFolderDataset(split.train, transform=lambda im: torch.tensor(im.size))
    assert len(dataset) == 4
    image, label = dataset[3]
    assert image.tolist() == [8, 8] and label == 1
    split.train[0][0].write_bytes(b"overwritten")
    with pytest.raises(RuntimeError, match="cat[/\\\\]000.png"):
        dataset[0]


def test_cached_dataset_decodes_each_file_once(tmp_path):
    split = scan_image_folder(make_folder(tmp_path, {"cat": 2, "dog": 2}), val_fraction=0)
    to_array = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    cached = ImageFolderDataset(split.train, transform=to_array, cache=True)
    first = [cached[i][0] for i in range(4)]
    for path, _ in split.train:
        path.write_bytes(b"gone")  # a second read would fail
    assert all(torch.equal(cached[i][0], first[i]) for i in range(4))
    uncached = ImageFolderDataset(split.train, transform=to_array)
    with pytest.raises(RuntimeError, match="000.png"):
        uncached[0]


def test_grey_level_dataset_hands_the_transform_L_images(tmp_path):
    split = scan_image_folder(make_folder(tmp_path, {"cat": 2, "dog": 2}), val_fraction=0)
    seen = []
    grey = ImageFolderDataset(split.train, transform=lambda im: seen.append(im) or 0,
                              cache=True, channels=1)
    grey[0], grey[0]
    rgb = Image.open(split.train[0][0]).convert("RGB")
    assert [im.mode for im in seen] == ["L", "L"]
    assert np.array_equal(np.asarray(seen[0]), np.asarray(rgb.convert("L")))
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(split.train, transform=None, channels=2)


def test_scan_keeps_decoded_images_for_a_cached_dataset(tmp_path):
    root = make_folder(tmp_path, {"cat": 2, "dog": 2})
    (root / "dog" / "broken.png").write_bytes(b"junk")
    assert scan_image_folder(root, val_fraction=0).images == {}  # not asked: nothing held
    split = scan_image_folder(root, val_fraction=0, keep_images=True)
    assert sorted(split.images) == sorted(path for path, _ in split.train)  # not the broken one
    first = split.train[1][0]
    assert np.array_equal(np.asarray(split.images[first]), np.asarray(Image.open(first)))
    for path, _ in split.train:
        path.write_bytes(b"gone")  # the dataset must not read the files again
    seen = []
    grey = ImageFolderDataset(split.train, transform=lambda im: seen.append(im) or 0,
                              cache=True, channels=1, decoded=split.images)
    for i in range(4):
        grey[i]
    assert [im.mode for im in seen] == ["L"] * 4
    assert np.array_equal(np.asarray(seen[1]), np.asarray(split.images[first].convert("L")))
    uncached = ImageFolderDataset(split.train, transform=None, decoded=split.images)
    with pytest.raises(RuntimeError, match="000.png"):  # `decoded` fills a cache, no more
        uncached[0]
