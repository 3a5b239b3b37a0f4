r"""Physical vapour deposition: four modalities from one shared latent.

Each sample has a deposition regime :math:`r \in \{0, 1, 2\}` and a latent state
:math:`u = m_r + 0.5\,\epsilon \in \mathbb R^3`. Each observed modality sees only part of
:math:`u`, and the residual stress needs all of it, which is the seed's "greater than the sum of
the parts" situation:

* ``X1`` image-like field (12 x 12): a smooth non-linear map of :math:`(u_0, u_1)` + noise 0.3;
* ``X2`` XRD-like spectrum (40 points): three Gaussian peaks whose shift follows :math:`u_1` and
  whose heights follow :math:`u_2`, + noise 0.05;
* ``X3`` process parameters (4): linear in :math:`(u_0, u_2)` + noise 0.2;
* ``X4`` residual stress (scalar): :math:`3 + u_0 + u_1 + u_2 + 0.05\,\epsilon`.

The maps are fixed (drawn once from a constant seed); ``seed`` changes the samples only.
"""

from __future__ import annotations

import numpy as np

from pima_pyro.data import MultimodalData
from pima_pyro.models.modalities import GaussianModality, Modality

#: Regime means of the latent state (3 regimes in 3 dimensions).
REGIME_MEANS = np.array([[-1.0, -0.5, 0.8], [1.0, -0.8, -0.6], [0.0, 1.2, 0.2]])
_STRUCTURE_SEED = 20240611
SPECTRUM_POINTS = 40
FIELD_SIZE = 12
NOISE = {"X1": 0.3, "X2": 0.05, "X3": 0.2, "X4": 0.05}


def _maps():
    rng = np.random.default_rng(_STRUCTURE_SEED)
    field_weights = rng.normal(size=(FIELD_SIZE * FIELD_SIZE, 2))
    field_bias = rng.normal(scale=0.5, size=FIELD_SIZE * FIELD_SIZE)
    process_weights = rng.normal(size=(4, 2))
    return field_weights, field_bias, process_weights


def pvd(n_samples: int = 600, seed: int = 0) -> MultimodalData:
    """Modalities ``X1`` (12, 12), ``X2`` (40,), ``X3`` (4,), ``X4`` (1,); labels = regime."""
    if n_samples < 3:
        raise ValueError(f"pvd: n_samples must be >= 3, got {n_samples}")
    rng = np.random.default_rng(seed)
    field_weights, field_bias, process_weights = _maps()
    regime = rng.integers(0, 3, size=n_samples)
    u = REGIME_MEANS[regime] + 0.5 * rng.standard_normal((n_samples, 3))
    x1 = np.tanh(u[:, :2] @ field_weights.T + field_bias)
    x1 = x1 + NOISE["X1"] * rng.standard_normal(x1.shape)
    angle = np.linspace(0.0, 1.0, SPECTRUM_POINTS)
    centres = np.array([0.2, 0.5, 0.8])[None, :] + 0.04 * u[:, 1:2]
    heights = np.exp(0.5 * u[:, 2:3] * np.array([1.0, -1.0, 0.5])[None, :])
    x2 = (
        heights[:, :, None] * np.exp(-((angle[None, None, :] - centres[:, :, None]) ** 2) / 0.004)
    ).sum(1)
    x2 = x2 + NOISE["X2"] * rng.standard_normal(x2.shape)
    x3 = u[:, [0, 2]] @ process_weights.T + NOISE["X3"] * rng.standard_normal((n_samples, 4))
    x4 = 3.0 + u.sum(1, keepdims=True) + NOISE["X4"] * rng.standard_normal((n_samples, 1))
    return MultimodalData(
        {"X1": x1.reshape(n_samples, FIELD_SIZE, FIELD_SIZE), "X2": x2, "X3": x3, "X4": x4},
        labels=regime,
    )


def pvd_modalities() -> dict[str, Modality]:
    """Gaussian specs with each modality's true noise level as its fixed scale."""
    return {
        "X1": GaussianModality(scale=NOISE["X1"], hidden=(128, 64)),
        "X2": GaussianModality(scale=NOISE["X2"], hidden=(64, 64)),
        "X3": GaussianModality(scale=NOISE["X3"], hidden=(32, 32)),
        "X4": GaussianModality(scale=NOISE["X4"], hidden=(32, 32)),
    }
