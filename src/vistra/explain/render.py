"""Pictures of explanations: a colour-mapped overlay at the image's own size, and a grid of
an image beside its maps for several methods."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from . import Explanation

_ALPHA = 0.5  # weight of the heat map over the image
_GRID_PANEL = 192  # minimum side of a panel in a grid: small images are enlarged


def colourise(heat: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 through matplotlib's 'jet' colour map
    (blue cold, red hot: the convention of the attention-map literature)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.uint8)


def caption_text(explanation: Explanation) -> str:
    name = explanation.label if explanation.label is not None else f"class {explanation.target}"
    return f"{name} {100 * explanation.probability:.1f}%"


def overlay(image: Image.Image, explanation: Explanation, *, caption: bool = True
            ) -> Image.Image:
    """The image (as RGB, same size) blended with the colour-mapped map; with `caption`,
    the class name and probability on a dark banner at the top, shrunk to fit the width."""
    heat = explanation.map.numpy()
    if heat.shape != (image.height, image.width):
        raise ValueError(f"the map is {heat.shape[1]}x{heat.shape[0]} but the image is "
                         f"{image.width}x{image.height}; explain this image itself")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - _ALPHA) * base + _ALPHA * colourise(heat).astype(np.float32)
    out = Image.fromarray(blended.round().astype(np.uint8))
    if caption:
        _draw_caption(out, caption_text(explanation))
    return out


def _draw_caption(image: Image.Image, text: str) -> None:
    size = max(6, min(24, image.width // 12))
    font = ImageFont.load_default(size=size)
    while size > 6 and font.getlength(text) > image.width - 4:
        size -= 1
        font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    pad = max(1, (bottom - top) // 4)
    draw = ImageDraw.Draw(image, "RGBA")
    draw.rectangle((0, 0, min(image.width, right - left + 2 * pad), bottom - top + 2 * pad),
                   fill=(0, 0, 0, 170))
    draw.text((pad - left, pad - top), text, font=font, fill=(255, 255, 255))


def grid(image: Image.Image, explanations: list[Explanation]) -> Image.Image:
    """The image, then one overlay per explanation, side by side, each titled with its
    method and caption. Images smaller than a panel are enlarged (nearest neighbour)."""
    scale = max(1, -(-_GRID_PANEL // max(image.width, image.height)))
    w, h = image.width * scale, image.height * scale
    title = 16
    panels = [("input", image.convert("RGB"))] + [
        (f"{e.method}: {caption_text(e)}", overlay(image, e, caption=False))
        for e in explanations]
    sheet = Image.new("RGB", (len(panels) * (w + 4) + 4, h + title + 8), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, (text, panel) in enumerate(panels):
        x = 4 + i * (w + 4)
        sheet.paste(panel.resize((w, h), Image.Resampling.NEAREST), (x, title + 4))
        while text and font.getlength(text) > w:
            text = text[:-1]
        draw.text((x, 2), text, font=font, fill=(0, 0, 0))
    return sheet
