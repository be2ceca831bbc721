"""A task whose answer is a place: 28x28 grey images whose class is the quadrant of a bright
object, with a dimmer object in another quadrant as a distractor. A map explaining the class
must peak in the bright object's quadrant; the dim one shows whether it tells the two apart.
A fifth class, images with the dim object only, closes the shortcut four exhaustive classes
leave: without it a model may learn one quadrant as "no bright object in the other three",
and then it never looks at that quadrant's object, and a faithful map must not peak there
(a ViT did so: all its misses were the bottom-right class, with maps flat within 0.07).
Used by tests/test_explain_location.py and benchmarks/explain.py, so both measure the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vistra.data import eval_transform
from vistra.explain import explain_batch
from vistra.train import TrainConfig, train
from vistra.weights import load_checkpoint

SIZE = 28
HALF = SIZE // 2
# Folder names that sort in the order of the class indices (row-major quadrants).
QUADRANTS = ("q0-top-left", "q1-top-right", "q2-bottom-left", "q3-bottom-right")
NONE = len(QUADRANTS)  # the class of images without a bright object
CLASSES = (*QUADRANTS, "q4-none")
BRIGHT, DIM, BACKGROUND, NOISE = 230, 120, 30, 12
TRAIN_IMAGES, VAL_IMAGES, EPOCHS, LR = 1800, 300, 12, 2e-3
HELD_OUT_SEED = 1000  # training and validation images use the seeds below it


def location_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 [n, 28, 28] and their classes [n]: a bright square (3-7 px a side, at a
    random place inside its quadrant) and a dim one of its own random size in another
    quadrant, on a noisy dark background; or, class NONE (a fifth of them), the dim one
    alone. Sizes are drawn independently, so the distractor is often the larger: only
    brightness tells the class."""
    rng = np.random.default_rng(seed)
    images = rng.normal(BACKGROUND, NOISE, (n, SIZE, SIZE))
    labels = rng.integers(0, len(CLASSES), n)
    for image, label in zip(images, labels, strict=True):
        distractor = (label + rng.integers(1, 4)) % 4
        objects = ((distractor, DIM),) if label == NONE else ((label, BRIGHT), (distractor, DIM))
        for quadrant, level in objects:
            side = int(rng.integers(3, 8))
            row = (quadrant // 2) * HALF + int(rng.integers(0, HALF - side + 1))
            col = (quadrant % 2) * HALF + int(rng.integers(0, HALF - side + 1))
            image[row:row + side, col:col + side] = level + rng.normal(0, NOISE, (side, side))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_location_folder(root: Path, seed: int = 0) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png, for `vistra train`."""
    for part, n, part_seed in (("train", TRAIN_IMAGES, seed), ("val", VAL_IMAGES, seed + 1)):
        images, labels = location_images(n, part_seed)
        for name in CLASSES:
            (root / part / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image, "L").save(root / part / CLASSES[label] / f"{i:05d}.png")
    return root


def train_location_model(name: str, data: Path, output: Path, model_kwargs: dict | None = None,
                         epochs: int = EPOCHS, seed: int = 0) -> torch.nn.Module:
    """`name` trained on a `write_location_folder` through vistra's training loop; its best
    checkpoint, loaded. No flips or crops: they would carry the object into another class's
    quadrant. No explain choice at the end: the family default is what is measured."""
    train(TrainConfig(data=str(data), model=name, output=str(output),
                      model_kwargs=model_kwargs or {}, epochs=epochs, batch_size=32, lr=LR,
                      warmup_epochs=0.5, scale=(1.0, 1.0), hflip=0.0, workers=0,
                      cache_images=True, explain_choose=False, quiet=True, seed=seed))
    model = load_checkpoint(output / "best.safetensors").eval()
    assert tuple(model.classes) == CLASSES, model.classes
    return model


def held_out(model: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n new images with a bright object (the ones a map can be right about) through the
    model's evaluation transform, as its PNGs were, and their classes."""
    images, labels = location_images(2 * n, HELD_OUT_SEED)
    located = labels != NONE
    images, labels = images[located][:n], labels[located][:n]
    assert len(labels) == n, "too few images with a bright object drawn"
    transform = eval_transform(model)
    x = torch.stack([transform(Image.fromarray(image, "L")) for image in images])
    return x, torch.as_tensor(labels)


def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) == labels).float().mean())


def peak_quadrants(maps: torch.Tensor) -> torch.Tensor:
    """The quadrant (class index) of each map's maximum, maps [B, 28, 28]."""
    peak = maps.flatten(1).argmax(1)
    return (peak // SIZE >= HALF).long() * 2 + (peak % SIZE >= HALF).long()


def location_share(maps: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of maps [B, 28, 28] whose maximum lies in the deciding object's quadrant."""
    return float((peak_quadrants(maps) == labels).float().mean())


def method_share(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                 method: str) -> float:
    """`location_share` of a vistra method's maps, each explaining the image's class."""
    return location_share(explain_batch(model, x, method, labels)[0], labels)
