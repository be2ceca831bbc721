"""Attention cost against image size, global against windowed: the Swin paper's formulas and the
measured time of the same layer, for a model's first stage (where the map is largest)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vistra.models import get_family, get_spec
from vistra.models.swin import WindowAttention, window_partition, window_reverse
from vistra.models.vit import Attention

from .complexity import Stage, msa_macs, stages, wmsa_macs

SIZES = (112, 160, 224, 320, 448, 640, 1024)
GLOBAL_TIME_LIMIT_MACS = 2e10  # beyond this, global attention is too slow to time on a CPU


@dataclass
class ScalingPoint:
    img_size: int
    tokens: int  # h * w of the first stage
    msa_macs: int
    wmsa_macs: int
    msa_ms: float | None  # None: not timed (over GLOBAL_TIME_LIMIT_MACS)
    wmsa_ms: float


def _first_stage(name: str, img_size: int) -> Stage:
    return stages(replace(get_spec(name).arch, img_size=(img_size, img_size)))[0]


def _best_ms(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after a warm-up: single layers run for milliseconds, where
    other work on a shared machine adds noise but never removes time."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def attention_scaling(name: str, sizes: tuple[int, ...] = SIZES, repeats: int = 5,
                      time_layers: bool = True) -> list[ScalingPoint]:
    """For each square image size: one first-stage attention layer of `name` (its width,
    heads and window; for ViT a 7x7 what-if window) under both formulas, and the best time
    of a randomly initialised layer of each kind on one image (batch 1, fp32)."""
    points = []
    for size in sizes:
        s = _first_stage(name, size)
        msa, wmsa = msa_macs(s.h, s.w, s.dim), wmsa_macs(s.h, s.w, s.dim, s.window)
        msa_ms = wmsa_ms = float("nan")
        if time_layers:
            msa_ms, wmsa_ms = _time_layers(s, msa <= GLOBAL_TIME_LIMIT_MACS, repeats)
        points.append(ScalingPoint(size, s.h * s.w, msa, wmsa, msa_ms, wmsa_ms))
    return points


def _time_layers(s: Stage, time_global: bool, repeats: int) -> tuple[float | None, float]:
    M = s.window
    windows = WindowAttention(s.dim, s.heads, M, True, None, 0.0, 0.0).eval()
    hp, wp = s.h - s.h % -M, s.w - s.w % -M
    x = torch.randn(1, s.h, s.w, s.dim)

    def windowed() -> None:
        y = F.pad(x, (0, 0, 0, wp - s.w, 0, hp - s.h))
        window_reverse(windows(window_partition(y, M), None), M, hp, wp)

    tokens = x.view(1, s.h * s.w, s.dim)
    full = Attention(s.dim, s.heads, True, None, 0.0, 0.0).eval()
    with torch.inference_mode():
        global_ms = _best_ms(lambda: full(tokens), repeats) if time_global else None
        return global_ms, _best_ms(windowed, repeats)


def plot_attention_scaling(name: str, path: str | Path, sizes: tuple[int, ...] = SIZES,
                           repeats: int = 5, time_layers: bool = True) -> Path:
    """Two log-log panels against image size: analytic MACs and measured time of one
    first-stage attention layer, global (quadratic in hw) and windowed (linear in hw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    points = attention_scaling(name, sizes, repeats, time_layers)
    s = _first_stage(name, sizes[0])
    what_if = "" if get_family(get_spec(name).arch).windowed else " (what-if)"
    x = [p.img_size for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    left.plot(x, [p.msa_macs / 1e9 for p in points], "o-", color="C3",
              label="global MSA: 4hwC² + 2(hw)²C")
    left.plot(x, [p.wmsa_macs / 1e9 for p in points], "s-", color="C0",
              label=f"W-MSA, M={s.window}{what_if}: 4hwC² + 2M²hwC")
    left.set_title("analytic cost (Liu et al. 2021, Eq. 1 and 2)")
    left.set_ylabel("GMACs per layer, one image")
    timed = [p for p in points if p.msa_ms is not None]
    untimed = (f"\n(not timed past {timed[-1].img_size} px: > {GLOBAL_TIME_LIMIT_MACS / 1e9:.0f}"
               " GMACs)" if timed and len(timed) < len(points) else "")
    right.plot([p.img_size for p in timed], [p.msa_ms for p in timed], "o-", color="C3",
               label=f"global (vistra ViT Attention){untimed}")
    right.plot(x, [p.wmsa_ms for p in points], "s-", color="C0",
               label=f"windows, M={s.window} (vistra WindowAttention)")
    right.set_title(f"measured on this CPU (batch 1, fp32, best of {repeats})")
    right.set_ylabel("ms per layer")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in x], minor=False)
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("image side (pixels); tokens hw grow as its square")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{name}: one first-stage attention layer (C={s.dim}, {s.heads} heads). "
                 "Global grows with (hw)², windows with hw", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
