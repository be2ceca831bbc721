"""Filling removed pixels from their surroundings, for deletion curves that do not reward
scattered deletions (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ROAD).

Pixels replaced by a constant leave a trace the model can read: the mask's own shape, and
for pixels scattered at random a salt-and-pepper texture no training image had. A random
order then destroys the prediction faster than any map of blobs can, for reasons that have
nothing to do with where the evidence is. Noisy linear imputation fills each removed pixel
with the weighted mean of its eight neighbours (1/6 for the sides, 1/12 for the corners),
all removed pixels solved together as one sparse linear system, plus a little noise: a lone
pixel becomes the mean of its neighbours and is gone without a trace, a removed blob is
bridged smoothly, and what disappears is the information, not the texture.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

NEIGHBOURS = (((0, 1), 1 / 6), ((0, -1), 1 / 6), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
              ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12))


def linear_imputation(x: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """x [C, H, W] with the pixels where removed [H, W] is True filled: each one the
    neighbour-weighted mean of the pixels around it (inside the image), solved jointly, plus
    Gaussian noise of std `noise` (ROAD's default 0.01). Every pixel removed: the image's
    mean colour, as nothing is left to interpolate from. A new tensor; x is left as it is."""
    C, H, W = x.shape
    missing = np.flatnonzero(removed.cpu().numpy().reshape(-1))
    n = len(missing)
    if n == 0:
        return x.clone()
    if n == H * W:
        return x.mean(dim=(1, 2), keepdim=True).expand(C, H, W).clone()
    known = x.detach().reshape(C, -1).cpu().double().numpy()
    unknown_index = np.full(H * W, -1)
    unknown_index[missing] = np.arange(n)
    row, col = missing // W, missing % W
    equation = np.arange(n)
    # Equation i: (sum of its neighbours' weights) v_i - sum_{removed j} w_ij v_j
    #             = sum_{kept j} w_ij x_j
    diagonal = np.zeros(n)
    rhs = np.zeros((n, C))
    rows, cols, values = [equation], [equation], []
    for (dr, dc), weight in NEIGHBOURS:
        r, c = row + dr, col + dc
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        eq, neighbour = equation[inside], (r * W + c)[inside]
        diagonal[eq] += weight
        is_unknown = unknown_index[neighbour] >= 0
        rows.append(eq[is_unknown])
        cols.append(unknown_index[neighbour[is_unknown]])
        values.append(np.full(int(is_unknown.sum()), -weight))
        rhs[eq[~is_unknown]] += weight * known[:, neighbour[~is_unknown]].T
    values.insert(0, diagonal)
    system = csc_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(n, n))
    solved = torch.from_numpy(spsolve(system, rhs).reshape(n, C).T.copy())
    out = x.detach().reshape(C, -1).clone()
    out[:, torch.from_numpy(missing)] = (solved.to(x.dtype)
                       + noise * torch.randn(C, n, generator=generator, dtype=x.dtype)
                       ).to(x.device)
    return out.view(C, H, W)
