r"""scikit-learn's digits paired with curves from any physics law: a test bed for experts,
starts, the choice of K and missing curves.

.. math::

    y_n = f(t; \theta_{Z_n}) + \varepsilon_n, \qquad \varepsilon_n \sim \mathcal N(0,
    \texttt{noise\_std}^2 I),

where :math:`Z_n` is the digit of image :math:`n` and ``params[d]`` is :math:`\theta_d`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from pima_pyro.data import MultimodalData


def digits_physics(
    law: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Mapping[int, Sequence[float]],
    grid: Sequence[float] | np.ndarray,
    noise_std: float = 0.1,
    seed: int = 0,
    sizes: Mapping[int, int] | None = None,
    hide_fraction: float = 0.0,
) -> MultimodalData:
    """Digits whose label ``d`` is in ``params``, each with a curve ``law(theta_d, t)`` plus noise.

    Args:
        law: ``law(theta, t) -> (..., T)`` for ``theta`` of shape (..., P), the signature of
            :meth:`PhysicsExpert.expected_curve` (e.g. ``ExponentialDecay().expected_curve``).
        params: ``digit -> theta`` (P,): the digits kept and their true parameters.
        grid: the curve's grid t (T,).
        sizes: optional ``digit -> number of samples`` (the first ones of that digit), for
            unbalanced clusters; default all of them (about 180 per digit).
        hide_fraction: fraction of samples, drawn at random, whose curve is masked as missing.

    ``labels`` are the digits.
    """
    if noise_std < 0:
        raise ValueError(f"digits_physics: noise_std must be >= 0, got {noise_std}")
    if not 0.0 <= hide_fraction < 1.0:
        raise ValueError(f"digits_physics: hide_fraction must be in [0, 1), got {hide_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = []
    for digit in sorted(params):
        rows = np.flatnonzero(digits.target == digit)
        if sizes is not None:
            if digit not in sizes or not 0 < sizes[digit] <= rows.size:
                raise ValueError(
                    f"digits_physics: sizes[{digit}] must be in 1..{rows.size}, got "
                    f"{None if sizes is None else sizes.get(digit)}"
                )
            rows = rows[: sizes[digit]]
        keep.append(rows)
    rows = np.sort(np.concatenate(keep))
    labels = digits.target[rows].astype(np.int64)
    t = torch.as_tensor(np.asarray(grid, dtype=np.float64))
    theta = torch.as_tensor(np.array([params[int(d)] for d in labels], dtype=np.float64))
    with torch.no_grad():
        means = law(theta, t).numpy()
    rng = np.random.default_rng(seed)
    curves = means + rng.normal(0.0, noise_std, means.shape)
    observed = rng.random(labels.size) >= hide_fraction
    return MultimodalData(
        {"image": (digits.images[rows] / 16.0).astype(np.float32), "curve": curves},
        masks={"curve": observed},
        grids={"curve": t.numpy()},
        labels=labels,
    )
