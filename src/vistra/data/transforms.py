"""Image transforms for training and evaluation, written with Pillow and torch only.

They follow torchvision's semantics (RandomResizedCrop, Resize + CenterCrop, RandAugment) so
recipes and reported accuracies carry over, without depending on torchvision.

All randomness comes from torch's global RNG (torch.rand / torch.randint). DataLoader seeds
that RNG in each worker from the main process's seed, so `torch.manual_seed` alone makes a
run's augmentations reproducible, with different draws in different workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

Size = int | tuple[int, int]
Fill = tuple[int, int, int] | int  # an RGB colour, or a grey level for "L" images
_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def to_tensor_normalized(
    image: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """PIL image -> float tensor [C, H, W] of (pixel / 255 - mean) / std.

    C is len(mean): 3 (RGB) or 1 (the grey level, as Pillow's "L" conversion weighs RGB).
    The arithmetic is in numpy: on small images torch's per-call overhead would cost more
    than the pixels.
    """
    image = _in_mode(image, len(mean))
    pixels = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, -1)
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    return torch.from_numpy(np.ascontiguousarray(((pixels - shift) * scale).transpose(2, 0, 1)))


def _randint(low: int, high: int) -> int:
    """A torch-RNG integer in [low, high)."""
    return int(torch.randint(low, high, ()).item())


# --- RandAugment -------------------------------------------------------------------------
# Each op takes the image, a level in [0, 1] (signed for symmetric ops) and the fill colour.
# At level 1 (magnitude 10) the ops reach the maxima of torchvision's RandAugment.


def _identity(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return image


def _autocontrast(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageOps.equalize(image)


def _rotate(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return image.rotate(30.0 * level, Image.Resampling.BILINEAR, fillcolor=fill)


def _solarize(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageOps.solarize(image, threshold=round(255 * (1.0 - level)))


def _posterize(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageOps.posterize(image, bits=8 - round(4 * level))


def _color(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageEnhance.Color(image).enhance(1.0 + 0.9 * level)


def _contrast(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(1.0 + 0.9 * level)


def _brightness(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.0 + 0.9 * level)


def _sharpness(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return ImageEnhance.Sharpness(image).enhance(1.0 + 0.9 * level)


def _affine(image: Image.Image, coeffs: tuple[float, ...], fill: Fill) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill
    )


def _shear_x(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return _affine(image, (1, 0.3 * level, 0, 0, 1, 0), fill)


def _shear_y(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return _affine(image, (1, 0, 0, 0.3 * level, 1, 0), fill)


def _translate_x(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return _affine(image, (1, 0, 150 / 331 * level * image.width, 0, 1, 0), fill)


def _translate_y(image: Image.Image, level: float, fill: Fill) -> Image.Image:
    return _affine(image, (1, 0, 0, 0, 1, 150 / 331 * level * image.height), fill)


# name -> (op, whether the op is symmetric and so gets a random sign)
_OPS: dict[str, tuple[Callable[[Image.Image, float, Fill], Image.Image], bool]] = {
    "identity": (_identity, False),
    "autocontrast": (_autocontrast, False),
    "equalize": (_equalize, False),
    "rotate": (_rotate, True),
    "solarize": (_solarize, False),
    "posterize": (_posterize, False),
    "color": (_color, True),
    "contrast": (_contrast, True),
    "brightness": (_brightness, True),
    "sharpness": (_sharpness, True),
    "shear_x": (_shear_x, True),
    "shear_y": (_shear_y, True),
    "translate_x": (_translate_x, True),
    "translate_y": (_translate_y, True),
}
RANDAUGMENT_OPS = tuple(_OPS)


@dataclass(frozen=True)
class RandAugment:
    """Apply `num_ops` ops drawn uniformly (with replacement) from RANDAUGMENT_OPS.

    `magnitude` is on the paper's 0-10 scale; symmetric ops (rotate, shear, translate,
    enhance) pick their direction at random. Uncovered areas are filled with mid-grey, which
    normalises to roughly zero instead of the strong signal black would be.
    """

    num_ops: int = 2
    magnitude: float = 9.0
    fill: tuple[int, int, int] = (128, 128, 128)  # "L" images get the first value

    def __post_init__(self) -> None:
        if self.num_ops < 0 or not 0 <= self.magnitude <= 10:
            raise ValueError(
                f"RandAugment needs num_ops >= 0 and magnitude in [0, 10], got "
                f"({self.num_ops}, {self.magnitude})"
            )

    def __call__(self, image: Image.Image) -> Image.Image:
        for _ in range(self.num_ops):
            op, signed = _OPS[RANDAUGMENT_OPS[_randint(0, len(RANDAUGMENT_OPS))]]
            level = self.magnitude / 10.0
            if signed and torch.rand(()).item() < 0.5:
                level = -level
            image = op(image, level, self.fill if image.mode == "RGB" else self.fill[0])
        return image


# --- Training and evaluation pipelines --------------------------------------------------


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params as a (left, top, crop_w, crop_h) box.

    Ten tries for a box of random area fraction (in `scale`) and log-uniform aspect ratio
    (in `ratio`) that fits; otherwise the largest centred box with an allowed aspect ratio.
    With `scale` = (1, 1), no tries: that fallback box, drawing no random numbers.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    # With the whole area asked for, a box that fits is the whole image (up to a pixel of
    # rounding) and most tries miss: go straight to the fallback, which is that box.
    tries = 0 if scale[0] >= 1 else 10
    for _ in range(tries):
        # One draw of four numbers per try: each torch call costs more than the arithmetic.
        u_area, u_ratio, u_left, u_top = torch.rand(4).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_left * (width - w + 1)), int(u_top * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class RandomErasing:
    """Random erasing (Zhong et al. 2020), timm's `--reprob` with `--remode pixel`.

    With probability `prob`, one box of the normalised image tensor, of area fraction in
    `scale` and log-uniform aspect ratio in `ratio`, is replaced by standard-normal noise
    (the statistics of normalised pixels, so no new "black box" signal). Ten tries for a box
    that fits, else the image is left as it is. It regularises by hiding part of the
    object, without rescaling it as crops do.
    """

    prob: float = 0.25
    scale: tuple[float, float] = (0.02, 1 / 3)
    ratio: tuple[float, float] = (0.3, 1 / 0.3)

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise ValueError(f"random erasing probability must be in [0, 1], got {self.prob}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"random erasing area range must be in (0, 1], got {self.scale}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.prob == 0 or torch.rand(()).item() >= self.prob:
            return image
        channels, height, width = image.shape
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u_area, u_ratio, u_top, u_left = torch.rand(4).tolist()
            area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < h < height and 0 < w < width:
                top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
                image[:, top:top + h, left:left + w] = torch.randn(channels, h, w)
                return image
        return image


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop -> horizontal flip -> optional RandAugment -> normalised tensor
    -> optional random erasing.

    A class rather than a closure so DataLoader workers can pickle it under any start method.
    """

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    randaugment: RandAugment | None
    resample: Image.Resampling
    erasing: RandomErasing | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _in_mode(image, len(self.mean))
        left, top, w, h = random_resized_crop_box(image.width, image.height, self.scale, self.ratio)
        height, width = self.size
        # With scale [1, 1] on an image already of the output size the crop is the image
        # itself: resampling it would cost time and change nothing.
        whole_image = (left, top, w, h) == (0, 0, image.width, image.height)
        if not (whole_image and (w, h) == (width, height)):
            image = image.resize((width, height), self.resample,
                                 box=(left, top, left + w, top + h))
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            image = self.randaugment(image)
        tensor = to_tensor_normalized(image, self.mean, self.std)
        return self.erasing(tensor) if self.erasing is not None else tensor


@dataclass(frozen=True)
class EvalTransform:
    """Resize so the image covers size / crop_pct (keeping its shape), centre crop, normalise.

    Memory stays bounded by the crop size whatever the image's shape (see _MAX_COVER_AREA).
    """

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    resample: Image.Resampling

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _in_mode(image, len(self.mean))
        resized, box = self.geometry(image.width, image.height)
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        if resized[0] * resized[1] > _MAX_COVER_AREA * crop_w * crop_h:
            # An extreme shape: a 1x50000 strip would be resized to 256x12,800,000 pixels
            # (10 GB) to keep 224x224 of them. Resize only the source box the crop keeps:
            # the same crop, up to rounding, at the cost of the crop alone.
            sx, sy = image.width / resized[0], image.height / resized[1]
            source = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            image = image.resize((crop_w, crop_h), self.resample, box=source)
        else:
            if resized != image.size:
                image = image.resize(resized, self.resample)
            image = image.crop(box)
        return to_tensor_normalized(image, self.mean, self.std)

    def geometry(self, width: int, height: int
                 ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """For an image of width x height: the (width, height) it is resized to and the
        (left, top, right, bottom) crop box taken from that, so a map over the model's
        input can be placed back on the original image."""
        crop_h, crop_w = self.size
        resized = _cover_size(width, height, crop_w, crop_h, self.crop_pct)
        left = round((resized[0] - crop_w) / 2.0)
        top = round((resized[1] - crop_h) / 2.0)
        return resized, (left, top, left + crop_w, top + crop_h)


# The resized image may hold this many times the crop's pixels (aspect ratios up to ~14:1 at
# crop_pct 0.875) before only the cropped part is resized.
_MAX_COVER_AREA = 16


def _cover_size(
    width: int, height: int, crop_w: int, crop_h: int, crop_pct: float
) -> tuple[int, int]:
    """Smallest shape-preserving size covering crop / crop_pct.

    For a square crop this is torchvision's Resize(int(size / crop_pct)): the shorter side
    becomes that length and the longer one int(length * long / short).
    """
    target_w, target_h = int(crop_w / crop_pct), int(crop_h / crop_pct)
    if target_h / height >= target_w / width:
        return max(target_w, int(width * target_h / height)), target_h
    return target_w, max(target_h, int(height * target_w / width))


def pixel_mode(channels: int) -> str:
    """The Pillow mode images are handled in for a model of `channels` input channels."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 3 (RGB) or 1 (grey level), got {channels}")
    return "L" if channels == 1 else "RGB"


def _in_mode(image: Image.Image, channels: int) -> Image.Image:
    """The image in the mode a transform works in: "L" for grey-level models, else "RGB"."""
    mode = pixel_mode(channels)
    return image if image.mode == mode else image.convert(mode)


def grey_level(transform: TrainTransform | EvalTransform) -> TrainTransform | EvalTransform:
    """The same transform for a model built with in_chans=1: it works on the grey level
    ("L") from the start, normalised with the first channel's mean and std."""
    return replace(transform, mean=transform.mean[:1], std=transform.std[:1])


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resampling(name: str) -> Image.Resampling:
    if name not in _RESAMPLING:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLING)}, got {name!r}")
    return _RESAMPLING[name]


def build_train_transform(
    img_size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: tuple[int, float] | None = None,
    random_erasing: float = 0.0,
    interpolation: str = "bicubic",
) -> TrainTransform:
    """Training augmentation; `randaugment` is (num_ops, magnitude 0-10), e.g. (2, 9);
    `random_erasing` the probability of erasing a box of each image (0.25 is timm's usual)."""
    return TrainTransform(
        size=_pair(img_size),
        mean=tuple(mean),
        std=tuple(std),
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        randaugment=RandAugment(*randaugment) if randaugment else None,
        resample=_resampling(interpolation),
        erasing=RandomErasing(random_erasing) if random_erasing else None,
    )


def build_eval_transform(
    img_size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> EvalTransform:
    """Evaluation preprocessing: resize to img_size / crop_pct, centre crop img_size."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return EvalTransform(
        _pair(img_size), tuple(mean), tuple(std), crop_pct, _resampling(interpolation)
    )


# --- Batch-level mixing -------------------------------------------------------------------


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Class indices [B] -> probabilities [B, K]: 1 - smoothing + smoothing / K on the target."""
    off = smoothing / num_classes
    soft = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return soft.scatter_(1, targets.long().unsqueeze(1), 1.0 - smoothing + off)


class MixupCutmix:
    """Mix each batch with itself reversed: mixup blends images, cutmix pastes a box.

    Per batch, with probability `prob`, one of the two is applied (cutmix with probability
    `switch_prob` when both alphas are positive) with lambda ~ Beta(alpha, alpha). For cutmix
    lambda is then set to the exact fraction of the image left unpasted, so the soft targets
    match the pixels. Pairing with the reversed batch (as timm does) relies on the loader
    having shuffled; it costs no extra randomness.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        soft = smooth_one_hot(targets, self.num_classes, self.label_smoothing)
        if torch.rand(()).item() >= self.prob:
            return images, soft
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or torch.rand(()).item() < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            images, lam = _paste_box(images, partner, lam)
        else:
            images = images * lam + partner * (1.0 - lam)
        return images, soft * lam + soft.flip(0) * (1.0 - lam)


def _paste_box(
    images: torch.Tensor, partner: torch.Tensor, lam: float
) -> tuple[torch.Tensor, float]:
    """Paste a box of area ~ (1 - lam) from `partner`; return the images and the true lambda."""
    height, width = images.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = _randint(0, height), _randint(0, width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
