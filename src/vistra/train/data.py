"""The training run's data: a checked split, the model's transforms, and loaders whose every
random draw is a function of (seed, epoch, image index).

Seeding each image's augmentation from that triple, not from a worker's running RNG, gives
the same images whatever the number of worker processes or processes in the run, and lets
an interrupted run resume with exactly the augmentations it would have seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from vistra.data import (
    DatasetSplit,
    ImageFolderDataset,
    Transform,
    build_train_transform,
    eval_transform,
    fit_channels,
)

from .config import TrainConfig
from .distributed import DistContext

_MIX = 1_000_003  # a prime, so different (seed, epoch, index) give different seeds
_REPEAT = 1 << 40  # beyond any dataset's size: a repeat's index never meets an image's


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed for one image in one epoch (or, with index = -1 - rank, a process)."""
    return ((seed * _MIX + epoch) * _MIX + index) % (2 ** 63)


class EpochSeededSampler(Sampler):
    """Wraps a sampler; yields (index, seed of that image's draw in this epoch)."""

    def __init__(self, sampler: DistributedSampler | ClassBalancedSampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        drawn: Counter[int] = Counter()
        for i in self.sampler:
            # An image drawn again in the epoch (class-balanced sampling) gets new draws.
            yield i, draw_seed(self.seed, self.epoch, i + drawn[i] * _REPEAT)
            drawn[i] += 1

    def __len__(self) -> int:
        return len(self.sampler)


class ClassBalancedSampler(Sampler):
    """Draws, with replacement, as many images per epoch as the training set holds, each
    class equally often on average (an image's chance is 1 / (classes x its class's size));
    each process takes its share. The draws depend on (seed, epoch) only, as
    DistributedSampler's order does, so a resumed run draws the same images."""

    def __init__(self, labels: list[int], num_replicas: int, rank: int, seed: int) -> None:
        counts = torch.bincount(torch.tensor(labels))
        self.weights = 1.0 / counts[labels].double()
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = -(-len(labels) // num_replicas)  # per process, as DistributedSampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples * self.num_replicas,
                                  replacement=True, generator=generator)
        return iter(drawn[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights, n / (classes x n_c): 1 for every class of a balanced
    set, and 1 on average over the images of any set."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).double()
    return (len(labels) / (num_classes * counts.clamp(min=1))).float()


class SeededDataset(Dataset):
    """dataset[(index, seed)]: the item drawn with torch's RNG seeded to `seed`.

    The caller's RNG is left as it was, which matters without worker processes.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # Only the CPU generator, saved and restored by hand: torch.manual_seed also queues
        # a seed for every accelerator backend, costly per image, and fork_rng more so.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def train_transform(model: nn.Module, cfg: TrainConfig) -> Transform:
    """RandomResizedCrop + flip (+ RandAugment) + the model's normalisation (+ random
    erasing), the fine-tuning augmentation of timm and of the Swin paper's recipes."""
    dc = model.data_config
    randaugment = (cfg.randaugment_ops, cfg.randaugment_magnitude) if cfg.randaugment_ops else None
    transform = build_train_transform(dc.img_size, dc.mean, dc.std, scale=cfg.scale,
                                      hflip=cfg.hflip, randaugment=randaugment,
                                      random_erasing=cfg.random_erasing,
                                      interpolation=dc.interpolation)
    return fit_channels(transform, model.arch.in_chans)


def build_loaders(split: DatasetSplit, model: nn.Module, cfg: TrainConfig,
                  ctx: DistContext) -> tuple[DataLoader, EpochSeededSampler, DataLoader]:
    """Train loader (shuffled per epoch, or drawn class-balanced with balance "sampler";
    sharded over processes) and this process's share of the validation images (every image
    counted once over all processes)."""
    images = dict(cache=cfg.cache_images, channels=model.arch.in_chans, decoded=split.images)
    train_set = SeededDataset(ImageFolderDataset(split.train, train_transform(model, cfg),
                                                    **images))
    if cfg.balance == "sampler":
        order = ClassBalancedSampler([label for _, label in split.train], ctx.world_size,
                                     ctx.rank, cfg.seed)
    else:
        order = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True,
                                   seed=cfg.seed)
    sampler = EpochSeededSampler(order, cfg.seed)
    val_set = Subset(ImageFolderDataset(split.val, eval_transform(model), **images),
                     range(ctx.rank, len(split.val), ctx.world_size))
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers,
                  persistent_workers=cfg.workers > 0, pin_memory=ctx.device.type == "cuda",
                  # Worker seeds drawn from a private generator leave the global RNG alone.
                  generator=torch.Generator().manual_seed(cfg.seed))
    return (DataLoader(train_set, sampler=sampler, **common), sampler,
            DataLoader(val_set, shuffle=False, **common))
