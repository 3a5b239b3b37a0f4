r"""Tribology under progressive load: depth, friction and acoustic emission, two regimes.

Regime 0 (LC1, the film holds) and regime 1 (LC2, the film fails at a critical load
:math:`t_c \sim U(0.4, 0.7)`), on a normalised load grid of 50 points in [0, 1]:

* ``depth`` (physics): :math:`d = a_c t + b_c t^2` (:class:`Polynomial` of degree 2 without
  intercept drift), :math:`(a, b) = (0.5, 0.2)` or :math:`(0.5, 1.0)`, + noise 0.05;
* ``friction``: :math:`\mu = 0.15 + \Delta_c\, \sigma((t - t_c)/0.05)`, :math:`\Delta = 0.05`
  or :math:`0.3`, + noise 0.02;
* ``acoustic``: emission energy :math:`0.05 + A_c\, \sigma((t - t_c)/0.05)`, :math:`A = 0.05`
  or :math:`0.25`, + noise 0.25 (a weak, noisy witness of the regime).

The seed's question is whether :math:`p(c \mid \text{acoustic})` alone identifies the regime.
"""

from __future__ import annotations

import numpy as np

from pima_pyro.data import MultimodalData
from pima_pyro.models.experts import Polynomial
from pima_pyro.models.modalities import GaussianModality, Modality, PhysicsModality

LOAD_POINTS = 50
DEPTH_THETA = np.array([[0.0, 0.5, 0.2], [0.0, 0.5, 1.0]])  # polynomial coefficients c0, c1, c2
NOISE = {"depth": 0.05, "friction": 0.02, "acoustic": 0.25}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def tribology(n_samples: int = 400, seed: int = 0) -> MultimodalData:
    """Modalities ``depth``, ``friction``, ``acoustic`` (50 points each); labels = regime."""
    if n_samples < 2:
        raise ValueError(f"tribology: n_samples must be >= 2, got {n_samples}")
    rng = np.random.default_rng(seed)
    regime = rng.integers(0, 2, size=n_samples)
    load = np.linspace(0.0, 1.0, LOAD_POINTS)
    t_c = rng.uniform(0.4, 0.7, size=(n_samples, 1))
    step = _sigmoid((load[None, :] - t_c) / 0.05)
    powers = load[None, :, None] ** np.arange(3)[None, None, :]
    depth = (powers * DEPTH_THETA[regime][:, None, :]).sum(-1)
    depth = depth + NOISE["depth"] * rng.standard_normal(depth.shape)
    friction = 0.15 + np.where(regime[:, None] == 1, 0.3, 0.05) * step
    friction = friction + NOISE["friction"] * rng.standard_normal(friction.shape)
    acoustic = 0.05 + np.where(regime[:, None] == 1, 0.25, 0.05) * step
    acoustic = acoustic + NOISE["acoustic"] * rng.standard_normal(acoustic.shape)
    return MultimodalData(
        {"depth": depth, "friction": friction, "acoustic": acoustic},
        grids={"depth": load},
        labels=regime,
    )


def tribology_modalities() -> dict[str, Modality]:
    """A quadratic physics expert for depth; Gaussian friction and acoustic emission."""
    return {
        "depth": PhysicsModality(expert=Polynomial(2)),
        "friction": GaussianModality(scale=NOISE["friction"], hidden=(64, 32)),
        "acoustic": GaussianModality(scale=NOISE["acoustic"], hidden=(64, 32)),
    }
