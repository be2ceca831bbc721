"""vistra.explain's model-agnostic maps and where maps are placed: occlusion and RISE against
brute-force loops, the gradient against finite differences, tokens at their receptive
fields' centres, every tensor on the input's device, the model-randomisation sanity check,
and an exported .onnx model explained from the command line, by default with the method
recorded for it where the file can run that one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_explain_choose import a_choice
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vistra
from vistra.cli import main
from vistra.explain import METHODS, default_method, explain, explain_batch, methods_for
from vistra.explain.attention import rollout
from vistra.explain.faithfulness import randomised_copy, spearman
from vistra.explain.generic import token_geometry
from vistra.explain.perturbation import draw_rise_grids, occlusion, rise, rise_masks
from vistra.models import SwinConfig, SwinTransformer, VisionTransformer, ViTConfig
from vistra.weights import save_checkpoint


def scrambled(model: nn.Module) -> nn.Module:
    """Weights far from their initialisation, so that every input region matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def tiny_vit(**kw) -> VisionTransformer:
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
               num_heads=2)
    torch.manual_seed(0)
    return scrambled(VisionTransformer(ViTConfig(**{**cfg, **kw})))


def tiny_swin(**kw) -> SwinTransformer:
    cfg = dict(img_size=32, patch_size=4, in_chans=3, num_classes=3, embed_dim=16,
               depths=(2, 2), num_heads=(2, 2), window_size=4)
    torch.manual_seed(0)
    return scrambled(SwinTransformer(SwinConfig(**{**cfg, **kw})))


def mean_colours(x: torch.Tensor, fill: str = "mean") -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 1, 1]: each image's mean (or, `fill` "minimum", its minimum)
    of each channel."""
    reduce = {"mean": torch.mean, "minimum": torch.min}[fill]
    return torch.stack([torch.stack([reduce(channel) for channel in image]) for image in x]
                       )[:, :, None, None]


def reference_occlusion(model, x, target, window, stride, fill="mean") -> torch.Tensor:
    """Zeiler & Fergus with Captum's sliding window, one window at a time: each window
    (every `stride` pixels and one against the far edge) painted in the image's mean colour
    (or its minimum); a pixel's value is the mean log-probability drop over the windows
    that cover it."""
    B, _, H, W = x.shape

    def starts(n):
        w = min(window, n)
        s = list(range(0, n - w + 1, stride))
        return (s if s[-1] == n - w else s + [n - w]), w
    (tops, wh), (lefts, ww) = starts(H), starts(W)
    colour = mean_colours(x, fill)
    total = torch.zeros(B, H, W, dtype=torch.float64)
    count = torch.zeros(H, W)
    with torch.no_grad():
        for b in range(B):
            base = model(x[b:b + 1]).log_softmax(-1)[0, target[b]]
            for top in tops:
                for left in lefts:
                    box = (..., slice(top, top + wh), slice(left, left + ww))
                    occluded = x[b:b + 1].clone()
                    occluded[box] = colour[b:b + 1]
                    total[b][box[1:]] += float(base - model(occluded).log_softmax(-1)[0, target[b]])
                    if b == 0:
                        count[box[1:]] += 1
    return (total / count).float()


@pytest.mark.parametrize("size,window,stride,fill", [
    ((16, 16), 4, 2, "mean"),   # half-overlapping, the default's proportions
    ((20, 28), 6, 4, "mean"),   # non-square, the stride missing both far edges
    ((16, 16), 24, 1, "mean"),  # a window larger than the image: all of it hidden
    ((20, 28), 6, 4, "minimum"),  # hidden by the image's minimum
])
def test_occlusion_equals_a_brute_force_loop(size, window, stride, fill):
    model = tiny_vit(img_size=size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 3])
    maps, logits = occlusion(model, x, target, window=window, stride=stride, fill=fill,
                             batch_size=7)
    expected = reference_occlusion(model, x, target, window, stride, fill)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().max() > 1e-3  # not trivially equal
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    # the same map through a plain function batch -> logits, as for an exported model
    as_function = explain_batch(lambda b: model(b), x, "occlusion", target, window=window,
                                stride=stride, fill=fill)[0]
    torch.testing.assert_close(as_function, explain_batch(model, x, "occlusion", target,
                                                          window=window, stride=stride,
                                                          fill=fill)[0])


def test_occlusion_equals_captums_with_the_same_baseline():
    """Captum's Occlusion averages the output differences of the windows covering each
    input element, as ours; with windows that land on the far edges the two agree."""
    captum = pytest.importorskip("captum.attr")

    model = tiny_vit(img_size=(16, 24))
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 4])
    ours, _ = occlusion(model, x, target, window=4, stride=2)
    theirs = captum.Occlusion(lambda b: model(b).log_softmax(-1)).attribute(
        x, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), baselines=mean_colours(x),
        target=target)
    # Captum attributes per channel; a window hides every channel, so they are equal
    torch.testing.assert_close(ours, theirs[:, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fill", ["mean", "minimum"])
def test_rise_equals_a_brute_force_loop(fill):
    """Petsiuk et al.'s weighted sum of masks, each pixel divided by how much of it the
    masks kept; the masks' blend is with the image's mean colour (or its minimum)."""
    model = tiny_swin(img_size=(24, 20))
    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([2, 0])
    maps, _ = rise(model, x, target, masks=40, seed=3, fill=fill, batch_size=7)
    grids, shifts = draw_rise_grids(40, (24, 20), seed=3)
    masks = rise_masks(grids, shifts, (24, 20))
    colour = mean_colours(x, fill)
    expected = torch.zeros(2, 24, 20)
    with torch.no_grad():
        for b in range(2):
            for m in masks:
                seen = x[b:b + 1] * m + colour[b:b + 1] * (1 - m)
                expected[b] += model(seen).softmax(-1)[0, target[b]] * m
    # each pixel's sum over what the masks kept of it (the paper: over N p, its expectation)
    torch.testing.assert_close(maps, expected / masks.sum(0), atol=1e-5, rtol=1e-4)
    assert maps.std() > 1e-3
    again, _ = rise(model, x, target, masks=40, seed=3, fill=fill, batch_size=40)
    other, _ = rise(model, x, target, masks=40, seed=4, fill=fill)
    torch.testing.assert_close(again, maps)
    assert not torch.allclose(other, maps)


def test_an_unknown_fill_is_refused_before_the_model_runs():
    with pytest.raises(ValueError, match="fill must be one of mean, minimum, got 'black'"):
        explain_batch(lambda b: pytest.fail("the model ran"), torch.zeros(1, 3, 8, 8), "rise",
                      fill="black")


def test_rise_masks_are_the_authors_upsampled_and_shifted_grids():
    """eclique/RISE: each s x s grid resized bilinearly (skimage, order 1) to (s + 1) cells
    of ceil(H / s) pixels and cropped at a shift within a cell. Their resize reflects at the
    border where ours clamps; inside the outermost half cell the two are the same."""
    skimage = pytest.importorskip("skimage.transform")
    H, W, s = 30, 23, 7
    grids, shifts = draw_rise_grids(20, (H, W), cells=s, keep=0.5, seed=0)
    masks = rise_masks(grids, shifts, (H, W))
    ch, cw = math.ceil(H / s), math.ceil(W / s)
    assert masks.shape == (20, H, W) and 0 <= masks.min() and masks.max() <= 1
    assert (shifts[:, 0] < ch).all() and (shifts[:, 1] < cw).all() and (shifts >= 0).all()
    assert 0.35 < float(grids.mean()) < 0.65
    for grid, (dy, dx), mask in zip(grids, shifts.tolist(), masks, strict=True):
        up = skimage.resize(grid.numpy(), ((s + 1) * ch, (s + 1) * cw), order=1,
                            mode="reflect", anti_aliasing=False)
        theirs = up[dy:dy + H, dx:dx + W]
        # rows and columns whose source coordinate lies between the first and last cell
        rows = np.arange(dy, dy + H)
        cols = np.arange(dx, dx + W)
        inner_r = ((rows + 0.5) * s / ((s + 1) * ch) - 0.5 >= 0) & \
            ((rows + 0.5) * s / ((s + 1) * ch) - 0.5 <= s - 1)
        inner_c = ((cols + 0.5) * s / ((s + 1) * cw) - 0.5 >= 0) & \
            ((cols + 0.5) * s / ((s + 1) * cw) - 0.5 <= s - 1)
        np.testing.assert_allclose(mask.numpy()[np.ix_(inner_r, inner_c)],
                                   theirs[np.ix_(inner_r, inner_c)], atol=1e-6)


@pytest.mark.parametrize("make", [tiny_vit, lambda: tiny_swin(img_size=16)])
def test_gradient_equals_central_differences(make):
    """Simonyan et al.'s saliency max_c |dS/dx_c|, against (S(x + h) - S(x - h)) / 2h for
    every input value, in float64."""
    model = make().double()
    x = torch.randn(1, 3, *model.img_size, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    target = torch.tensor([1])
    maps, _ = explain_batch(model, x, "gradient", target)
    h = 1e-6
    steps = torch.eye(x.numel(), dtype=torch.float64).view(-1, *x.shape[1:]) * h
    with torch.no_grad():
        plus = torch.cat([model(x + d)[:, 1] for d in steps.split(256)])
        minus = torch.cat([model(x - d)[:, 1] for d in steps.split(256)])
    saliency = ((plus - minus) / (2 * h)).view(x.shape[1:]).abs().amax(0)
    expected = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    torch.testing.assert_close(maps[0], expected.float(), atol=1e-4, rtol=0)


# -- where tokens see ---------------------------------------------------------------------

def linearised(model: nn.Module, monkeypatch) -> nn.Module:
    """The model's stem with its nonlinearities and global norms taken out, so that the
    input pixels a token depends on are exactly its convolutions' receptive field: ReLUs
    and GroupNorms become identities, the hybrid's max-pool an average over the same
    window (its -inf padding read as 0)."""
    import vistra.models.resnetv2 as resnetv2

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, (nn.ReLU, nn.GroupNorm)):
                setattr(module, name, nn.Identity())
    functional = type("F", (), {name: staticmethod(getattr(F, name))
                                for name in ("pad", "conv2d")})
    functional.relu = staticmethod(lambda x: x)
    functional.max_pool2d = staticmethod(
        lambda x, k, s: F.avg_pool2d(torch.nan_to_num(x, neginf=0.0), k, s))
    monkeypatch.setattr(resnetv2, "F", functional)
    return model


def receptive_centre(model: nn.Module, token: tuple[int, int]) -> tuple[float, float]:
    """The middle of the input pixels that one token of the stem's output depends on."""
    size = model.img_size
    x = torch.randn(1, model.cfg.in_chans, *size, requires_grad=True)
    features = model.patch_embed.backbone(x)  # [1, C, h, w]
    features[0, :, token[0], token[1]].sum().backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    return (float(rows.min() + rows.max()) / 2, float(cols.min() + cols.max()) / 2)


@pytest.mark.parametrize("build,stride,offset", [
    (lambda: tiny_vit(img_size=32, patch_size=4, conv_stem=(8, 8, 8)), 4, 0.0),
    (lambda: tiny_vit(img_size=64, patch_size=8, conv_stem=(8, 8, 8)), 8, 0.0),
    (lambda: tiny_swin(img_size=32, patch_size=4, conv_stem=(8, 8)), 4, 0.0),
    (lambda: tiny_vit(img_size=96, hybrid_depths=(1, 1, 1)), 16, 15.0),
])
def test_token_geometry_is_the_centre_of_the_stems_receptive_field(build, stride, offset,
                                                                  monkeypatch):
    """A conv stem of 3x3 convs padded by 1 centres token i on pixel stride * i, not on its
    square's middle; the hybrid's SAME padding (more after than before) 7.5 pixels past it.
    Measured on the stem itself: the pixels a token's gradient reaches."""
    model = linearised(build(), monkeypatch)
    geometry = token_geometry(model)
    assert geometry == (stride, offset)
    assert offset != (stride - 1) / 2  # a stem that moves the centre
    h, w = (side // stride for side in model.img_size)
    for token in [(h // 2, w // 2), (h // 2 - 1, w // 2 - 1)]:  # inside the image's edges
        assert receptive_centre(model, token) == (offset + token[0] * stride,
                                                  offset + token[1] * stride)
    assert token_geometry(tiny_vit()) == (4, 1.5)  # a patch conv: the square's middle


def test_token_maps_follow_the_stem_to_the_receptive_field_centres():
    """Rollout on a ViT whose conv stem centres token i on pixel 8i: the map over the image
    interpolates the token values between those pixels (np.interp, the outermost values
    beyond them), not between the squares' middles 8i + 3.5."""
    model = tiny_vit(img_size=32, patch_size=8, conv_stem=(8, 8, 8))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens, _ = rollout(model, x)  # [2, 4, 4]
    maps, _ = explain_batch(model, x, "rollout")

    def placed(centres):
        out = []
        for grid in tokens.numpy():
            cols = np.stack([np.interp(np.arange(32), centres, row) for row in grid])
            out.append(np.stack([np.interp(np.arange(32), centres, col) for col in cols.T], 1))
        out = torch.from_numpy(np.stack(out)).float()
        low, high = out.amin((1, 2), keepdim=True), out.amax((1, 2), keepdim=True)
        return (out - low) / (high - low)
    torch.testing.assert_close(maps, placed(8.0 * np.arange(4)), atol=1e-5, rtol=1e-4)
    assert (maps - placed(8.0 * np.arange(4) + 3.5)).abs().max() > 0.1


# -- the input's device --------------------------------------------------------------------

class DevicesMade(TorchDispatchMode):
    """Records every operation whose output lands on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.on_meta: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves(out)):
            self.on_meta.append(str(func))
        return out


def made_off_device(run) -> list[str]:
    """Run with the default device set to meta and the inputs on the CPU: any tensor made
    without a device (torch.zeros(n), torch.eye(n), torch.tensor(...), ...) lands on meta
    and is recorded, as it would land on the CPU beside a model on a GPU."""
    with torch.device("meta"), DevicesMade() as seen:
        try:
            run()
        except (RuntimeError, NotImplementedError) as error:  # a meta tensor met a real one
            seen.on_meta.append(f"error: {error}")
    return seen.on_meta


def test_the_device_check_catches_a_tensor_made_on_the_default_device():
    x = torch.randn(2, 3)
    assert made_off_device(lambda: x @ torch.eye(3)) != []
    assert made_off_device(lambda: x @ torch.eye(3, device=x.device)) == []


@pytest.mark.parametrize("make", [
    lambda: tiny_vit(),
    lambda: tiny_vit(img_size=32, patch_size=8, conv_stem=(8, 8, 8)),
    lambda: tiny_swin(conv_stem=(8, 8)),
])
def test_every_method_makes_its_tensors_on_the_inputs_device(make):
    """What --device cuda needs: nothing made on the CPU behind the model's back."""
    model = make()
    x, target = torch.randn(2, 3, *model.img_size), torch.tensor([0, 1])
    for method in methods_for(model):
        made = made_off_device(lambda m=method: explain_batch(
            model, x, m, target, masks=16, window=8, stride=8))
        assert made == [], f"{method} made tensors off the input's device: {made[:3]}"
    function = lambda batch: model(batch)  # noqa: E731 - a Classifier's shape
    for method in methods_for(function):
        assert made_off_device(lambda m=method: explain_batch(function, x, m, masks=16)) == []


# -- the model-randomisation sanity check ------------------------------------------------------

def quadrant_task(n: int, seed: int, size: int = 32, square: int = 8):
    """Noise with one bright square; the class is the square's quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    label = torch.randint(0, 4, (n,), generator=g)
    half = size // 2
    for i, q in enumerate(label.tolist()):
        r = (q // 2) * half + int(torch.randint(0, half - square + 1, (1,), generator=g))
        c = (q % 2) * half + int(torch.randint(0, half - square + 1, (1,), generator=g))
        x[i, :, r:r + square, c:c + square] += 3.0
    return x, label


def trained_on_quadrants(model: nn.Module, steps: int, lr: float) -> nn.Module:
    x, y = quadrant_task(2000, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family,build,steps,lr", [
    ("vit", lambda: VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=1,
                                                num_classes=4, embed_dim=32, depth=2,
                                                num_heads=4)), 150, 2e-3),
    ("swin", lambda: SwinTransformer(SwinConfig(img_size=32, patch_size=4, in_chans=1,
                                                num_classes=4, embed_dim=16, depths=(2, 2),
                                                num_heads=(2, 4), window_size=4)), 200, 4e-3),
])
def test_maps_of_a_trained_and_a_reinitialised_model_differ(family, build, steps, lr):
    """Adebayo et al. 2018: a map that explains the model must change when its weights are
    replaced by fresh ones. The family's default, the model-agnostic perturbation methods and
    lrp, on a model trained for a few seconds to find the square's quadrant."""
    torch.manual_seed(0)
    model = trained_on_quadrants(build(), steps, lr)
    x, y = quadrant_task(16, 1)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy >= 0.9, f"the model did not learn the task (accuracy {accuracy:.2f})"
    fresh = randomised_copy(model, seed=1)
    for method in dict.fromkeys((default_method(model), "occlusion", "rise", "lrp")):
        options = dict(masks=200)
        trained = explain_batch(model, x, method, y, **options)[0]
        random = explain_batch(fresh, x, method, y, **options)[0]
        corr = float(spearman(trained, random).mean())
        print(f"{family} {method}: rank correlation with the re-initialised model {corr:+.3f}")
        assert corr < 0.5, f"{method}'s maps hardly depend on the weights ({corr:.2f})"


# -- an exported model ---------------------------------------------------------------------

def test_an_exported_onnx_model_is_explained_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from vistra.onnx import export_checkpoint
    from vistra.runtime import load_classifier

    torch.manual_seed(0)
    model = scrambled(vistra.create_model("vit_fmnist"))
    save_checkpoint(model, tmp_path / "m.safetensors", classes=[f"c{i}" for i in range(10)])
    onnx = export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx").path
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 30), np.uint8)).save(photo)
    out = tmp_path / "maps"
    assert main(["explain", str(onnx), str(photo), "--method", "occlusion", "rise",
                 "--masks", "64", "--window", "6", "--out", str(out)]) == 0
    for method in ("occlusion", "rise"):
        with Image.open(out / f"photo.{method}.png") as png:
            assert png.size == (30, 36)
        assert np.load(out / f"photo.{method}.npy").shape == (36, 30)
    # onnxruntime's map is PyTorch's
    image = Image.open(photo)
    ours = explain(load_classifier(onnx), image, method="occlusion", window=6).map
    torch.testing.assert_close(ours, explain(model, image, method="occlusion", window=6).map,
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.load(out / "photo.occlusion.npy"), ours.numpy(), atol=1e-6)
    # --fill reaches the method: hidden by the image's minimum, another map, PyTorch's
    assert main(["explain", str(onnx), str(photo), "--method", "occlusion", "--window", "6",
                 "--fill", "minimum", "--out", str(tmp_path / "minimum")]) == 0
    by_minimum = np.load(tmp_path / "minimum" / "photo.occlusion.npy")
    np.testing.assert_allclose(by_minimum, explain(model, image, method="occlusion", window=6,
                                                   fill="minimum").map.numpy(), atol=1e-4)
    assert np.abs(by_minimum - ours.numpy()).max() > 1e-2
    # without --method: occlusion; gradients and --evaluate need the PyTorch model
    assert main(["explain", str(onnx), str(photo), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "photo.occlusion.png").is_file()
    capsys.readouterr()
    assert main(["explain", str(onnx), str(photo), "--method", "gradient", "--out",
                 str(tmp_path / "g")]) == 2
    assert "occlusion, rise" in capsys.readouterr().err
    assert main(["explain", str(onnx), "--evaluate", "--data", str(tmp_path)]) == 2
    assert ".safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("recorded, method, why", [
    ("occlusion", "occlusion", "recorded by vistra train on 4 images of somewhere: ROAD "
                               "deletion 0.60x and mean-colour deletion 0.40x"),
    ("rise", "rise", "recorded by vistra train on 4 images of somewhere"),
    ("lrp", "occlusion", "the default of a model that is only run (the checkpoint's recorded "
                         "choice lrp needs the PyTorch model; an .onnx file runs occlusion and "
                         "rise only)"),
    (None, "occlusion", "the default of a model that is only run (no PyTorch module)"),
])
def test_an_onnx_file_follows_the_recorded_method_it_can_run(tmp_path, capsys, recorded,
                                                             method, why):
    """The record exported with the checkpoint picks the .onnx file's default while it is a
    method that only runs the model; one that needs gradients falls back, saying so."""
    pytest.importorskip("onnxruntime")
    from vistra.onnx import export_checkpoint

    torch.manual_seed(0)
    model = vistra.create_model("vit_fmnist", depth=1)
    model.card.explain = a_choice(recorded, by="vistra train") if recorded else None
    save_checkpoint(model, tmp_path / "m.safetensors")
    onnx = export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx").path
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(photo)
    assert main(["explain", str(onnx), str(photo), "--masks", "16", "--window", "14",
                 "--out", str(tmp_path / "maps")]) == 0
    assert f"method: {method}, {why}" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "maps").glob("*.npy")] == [f"photo.{method}.npy"]


def test_the_perturbation_methods_are_every_familys():
    for model in (tiny_vit(), tiny_swin()):
        assert {"occlusion", "rise", "gradient"} <= set(methods_for(model))
    assert methods_for(lambda b: b) == ("occlusion", "rise")
    assert set(methods_for(tiny_vit())) <= set(METHODS)
