"""Transforms match torchvision's semantics; mixing keeps images and soft targets consistent."""

import numpy as np
import pytest
import torch
from PIL import Image

from vistra.data.transforms import (
    RANDAUGMENT_OPS,
    MixupCutmix,
    RandAugment,
    RandomErasing,
    build_eval_transform,
    build_train_transform,
    grey_level,
    random_resized_crop_box,
    smooth_one_hot,
    to_tensor_normalized,
)

IDENTITY_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def pixels_of(tensor):
    """A tensor made with IDENTITY_NORM back to uint8 pixels [H, W, 3]."""
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def numbered_image(width, height):
    """Every pixel distinct: R = row, G = column, B = 7."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def test_to_tensor_normalized():
    image = Image.fromarray(np.array([[[0, 255, 51]]], np.uint8))
    tensor = to_tensor_normalized(image, mean=(0.5, 0.5, 0.0), std=(0.5, 0.5, 0.2))
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert tensor.flatten().tolist() == pytest.approx([-1.0, 1.0, 1.0])


@pytest.mark.parametrize("size, expected", [(224, (224, 224)), ((96, 160), (96, 160))])
def test_eval_transform_shape(size, expected):
    transform = build_eval_transform(size, (0.5,) * 3, (0.5,) * 3)
    for input_size in [(640, 480), (100, 300), (224, 224)]:
        assert transform(Image.new("RGB", input_size)).shape == (3, *expected)


def test_eval_centre_crop_takes_the_middle_pixels():
    # 10x10 at crop_pct 0.8 for size 8: no resize, an 8x8 crop starting at (1, 1).
    pixels = numbered_image(10, 10)
    out = build_eval_transform(8, crop_pct=0.8, **IDENTITY_NORM)(Image.fromarray(pixels))
    assert np.array_equal(pixels_of(out), pixels[1:9, 1:9])
    # 20 wide x 10 high: the shorter side is already 10, so crop rows 1-8, columns 6-13.
    pixels = numbered_image(20, 10)
    out = build_eval_transform(8, crop_pct=0.8, **IDENTITY_NORM)(Image.fromarray(pixels))
    assert np.array_equal(pixels_of(out), pixels[1:9, 6:14])


def test_eval_resize_keeps_aspect_ratio():
    # 300x200, left third black. Shorter side -> 256 gives 384x256 (edge at x=128); the centre
    # crop starts at x=80, so the edge lands at x=48. Squashing to 256x256 would put it at 69.
    pixels = np.full((200, 300, 3), 255, np.uint8)
    pixels[:, :100] = 0
    out = build_eval_transform(224, **IDENTITY_NORM)(Image.fromarray(pixels))
    row = out[0, 112]
    assert row[44].item() < 0.05 and row[52].item() > 0.95


@pytest.mark.parametrize("input_size", [(300, 100), (50, 400), (33, 33)])
def test_train_transform_output_shape(input_size):
    transform = build_train_transform((32, 48), (0.5,) * 3, (0.5,) * 3, randaugment=(2, 9))
    assert transform(Image.new("RGB", input_size, (10, 20, 30))).shape == (3, 32, 48)


def test_crop_box_falls_back_to_centre_when_nothing_fits():
    # Area 100% at aspect 1 never fits a 300x100 image: take the centred 100x100 square.
    assert random_resized_crop_box(300, 100, scale=(1, 1), ratio=(1, 1)) == (100, 0, 100, 100)


@pytest.mark.parametrize("size", [(28, 28), (40, 30), (300, 100)])
def test_whole_area_crop_box_is_the_fallback_and_draws_nothing(size):
    """scale (1, 1): the box the ten tries would end in, without spending random numbers."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    box = random_resized_crop_box(*size, scale=(1, 1), ratio=(3 / 4, 4 / 3))
    assert torch.equal(torch.get_rng_state(), before)
    expected = {(28, 28): (0, 0, 28, 28), (40, 30): (0, 0, 40, 30),
                (300, 100): (83, 0, 133, 100)}[size]  # 300x100 is wider than 4:3: centred
    assert box == expected


def test_crop_boxes_stay_inside_the_image():
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(120, 80, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80


def test_flip_and_full_crop():
    pixels = numbered_image(16, 16)
    transform = build_train_transform(16, scale=(1, 1), ratio=(1, 1), hflip=1.0, **IDENTITY_NORM)
    assert np.array_equal(pixels_of(transform(Image.fromarray(pixels))), pixels[:, ::-1])


def test_scale_one_leaves_an_image_of_the_output_size_untouched():
    """The Fashion-MNIST recipes' setting: no crop, no resampling, whatever aspect is drawn."""
    pixels = numbered_image(28, 28)
    transform = build_train_transform(28, scale=(1, 1), hflip=0.0, **IDENTITY_NORM)
    torch.manual_seed(0)
    for _ in range(50):
        assert np.array_equal(pixels_of(transform(Image.fromarray(pixels))), pixels)


def test_random_erasing_replaces_one_box_by_noise():
    """Each erased image differs from the original in exactly one axis-aligned box, of an
    area in the asked range; the rest is untouched, every channel erased alike."""
    erase = RandomErasing(prob=1.0, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3))
    original = torch.full((3, 28, 28), 5.0)  # far outside N(0, 1): the noise never equals it
    torch.manual_seed(0)
    areas = []
    for _ in range(100):
        changed = (erase(original.clone()) != original).all(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and changed.sum() == box.numel()  # one full rectangle, nothing else
        areas.append(box.numel() / 28 ** 2)
    assert 0.01 <= min(areas) and max(areas) <= 1 / 3 + 0.05
    assert max(areas) - min(areas) > 0.15  # the area really varies


def test_random_erasing_probability_and_noise_statistics():
    torch.manual_seed(0)
    erase = RandomErasing(prob=0.25)
    original = torch.full((1, 32, 32), 5.0)
    erased = [erase(original.clone()) for _ in range(2000)]
    rate = sum(not torch.equal(e, original) for e in erased) / len(erased)
    assert rate == pytest.approx(0.25, abs=0.03)
    noise = torch.cat([e[e != 5.0] for e in erased])
    assert noise.mean().item() == pytest.approx(0.0, abs=0.05)
    assert noise.std().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(RandomErasing(prob=0.0)(original.clone()), original)
    with pytest.raises(ValueError, match="probability"):
        RandomErasing(prob=1.5)


def test_train_transform_erases_after_normalising():
    """The erased box holds noise in normalised units, whatever the image's mean and std."""
    pixels = np.full((20, 20), 200, np.uint8)
    transform = build_train_transform(20, (0.5,), (0.25,), scale=(1, 1), hflip=0.0,
                                      random_erasing=1.0)
    torch.manual_seed(3)
    tensor = transform(Image.fromarray(pixels, "L"))
    level = (200 / 255 - 0.5) / 0.25
    kept = torch.isclose(tensor, torch.tensor(level))
    assert 0 < (~kept).sum() < tensor.numel() and tensor[~kept].abs().max() < 6


def test_train_transform_is_reproducible_from_torch_seed():
    image = Image.fromarray(numbered_image(64, 48))
    transform = build_train_transform(24, (0.5,) * 3, (0.5,) * 3, randaugment=(2, 9))
    torch.manual_seed(7)
    first = [transform(image) for _ in range(5)]
    torch.manual_seed(7)
    second = [transform(image) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])


class _Augmented(torch.utils.data.Dataset):
    def __init__(self):
        self.image = Image.fromarray(numbered_image(40, 30))
        self.transform = build_train_transform(16, (0.5,) * 3, (0.5,) * 3, randaugment=(2, 9))

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.transform(self.image)


def test_dataloader_workers_are_reproducible_and_differ():
    def run():
        torch.manual_seed(3)
        loader = torch.utils.data.DataLoader(_Augmented(), batch_size=4, num_workers=2)
        return torch.cat(list(loader))

    first, second = run(), run()
    assert torch.equal(first, second)
    assert not torch.equal(first[:4], first[4:])  # the two workers draw different crops


@pytest.mark.parametrize("op", RANDAUGMENT_OPS)
def test_every_randaugment_op_keeps_size_and_mode(op, monkeypatch):
    monkeypatch.setattr("vistra.data.transforms.RANDAUGMENT_OPS", (op,))
    image = Image.fromarray(numbered_image(20, 12))
    out = RandAugment(num_ops=1, magnitude=10)(image)
    assert out.size == (20, 12) and out.mode == "RGB"


def test_randaugment_magnitude_zero_changes_only_autocontrast_and_equalize():
    image = Image.fromarray(numbered_image(20, 12))
    torch.manual_seed(0)
    outputs = [np.asarray(RandAugment(num_ops=1, magnitude=0)(image)) for _ in range(60)]
    changed = sum(not np.array_equal(out, np.asarray(image)) for out in outputs)
    assert 0 < changed < 30  # 2 of 14 ops ignore the magnitude


def test_smooth_one_hot():
    soft = smooth_one_hot(torch.tensor([2, 0]), num_classes=4, smoothing=0.2)
    expected = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]])
    assert torch.allclose(soft, expected)


def constant_batch():
    """Image i is filled with the value i; its class is i as well."""
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16)
    return images.contiguous(), torch.arange(4)


def test_mixup_blends_images_and_targets_by_the_same_lambda():
    torch.manual_seed(0)
    mix = MixupCutmix(num_classes=4, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0)
    images, targets = constant_batch()
    mixed, soft = mix(images, targets)
    assert soft.sum(1).tolist() == pytest.approx([1.0] * 4)
    lam = soft[0, 0].item()  # image 0 is mixed with image 3 (the batch reversed)
    assert soft[0, 3].item() == pytest.approx(1 - lam)
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 0 * lam + 3 * (1 - lam)))


def test_cutmix_lambda_is_the_unpasted_area():
    torch.manual_seed(1)
    mix = MixupCutmix(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    images, targets = constant_batch()
    for _ in range(5):
        mixed, soft = mix(images, targets)
        assert soft.sum(1).tolist() == pytest.approx([1.0] * 4)
        plain = smooth_one_hot(targets, 4, 0.1)
        kept = (mixed[1] == 1).float().mean().item()  # image 1 pastes from image 2
        assert soft[1].tolist() == pytest.approx((plain[1] * kept + plain[2] * (1 - kept)).tolist())
    assert torch.equal(images, constant_batch()[0])  # the input batch is left untouched


def test_prob_zero_only_smooths():
    images, targets = constant_batch()
    mixed, soft = MixupCutmix(num_classes=4, prob=0.0, label_smoothing=0.1)(images, targets)
    assert torch.equal(mixed, images)
    assert torch.equal(soft, smooth_one_hot(targets, 4, 0.1))


def test_grey_level_transforms_work_on_the_luminance_with_the_first_channel_stats():
    pixels = numbered_image(20, 12)
    image = Image.fromarray(pixels)
    luminance = np.asarray(image.convert("L"), np.float32)
    mean, std = (0.25, 0.5, 0.5), (0.5, 0.2, 0.2)
    out = grey_level(build_eval_transform((12, 20), mean, std, crop_pct=1.0))(image)
    assert out.shape == (1, 12, 20)
    torch.testing.assert_close(out[0], torch.from_numpy((luminance / 255 - 0.25) / 0.5))
    train = grey_level(build_train_transform(8, mean, std, randaugment=(2, 9)))
    torch.manual_seed(0)
    assert all(train(image).shape == (1, 8, 8) for _ in range(30))  # every op on "L" images
