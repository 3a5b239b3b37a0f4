r"""Per-cluster physics experts :math:`f(t; \theta_c)`.

A physics modality observes a curve :math:`y \in \mathbb R^T` on a grid :math:`t` and, given the
cluster :math:`c`, is modelled as

.. math::

    y \mid c, t \sim \mathcal N\big(f(t; \theta_c),\ s_c^2 I\big).

An expert owns the per-cluster parameters :math:`\theta \in \mathbb R^{K \times P}` and the
per-cluster noise scales :math:`s \in \mathbb R_{>0}^K`. Experts that are *linear in theta*,
:math:`f(t; \theta_c) = \Phi(t)\,\theta_c`, also solve the seed's EM M-step in closed form:

.. math::

    \theta_c = \arg\min_\theta \sum_n r_{nc} \lVert y_n - \Phi\theta \rVert^2
             = (\Phi^\top \Phi)^{-1} \Phi^\top \bar y_c, \qquad
    \bar y_c = \frac{\sum_n r_{nc} y_n}{\sum_n r_{nc}},

    s_c^2 = \frac{\sum_n r_{nc} \lVert y_n - \Phi\theta_c\rVert^2}{T \sum_n r_{nc}}.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Floor on the per-cluster noise scale of an expert (relative floors are the caller's choice).
NOISE_SCALE_MIN: float = 1e-3


class PhysicsExpert(nn.Module):
    """Base class: per-cluster parameters ``theta`` (K, P) and noise scales ``noise_scale`` (K,).

    Subclasses define :meth:`expected_curve` and, when linear in theta, :meth:`design_matrix`.
    ``n_clusters`` is bound later by :meth:`bind` (the model decides K).
    """

    #: names of the P parameters, for export and plots
    param_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.n_clusters: int | None = None

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    def bind(self, n_clusters: int) -> PhysicsExpert:
        """Create the per-cluster parameters for ``n_clusters`` clusters."""
        self.n_clusters = n_clusters
        self.theta = nn.Parameter(torch.zeros(n_clusters, self.num_params))
        self.unconstrained_noise = nn.Parameter(torch.zeros(n_clusters))
        return self

    @property
    def noise_scale(self) -> torch.Tensor:
        """Per-cluster noise standard deviation ``s_c`` (K,), floored at ``NOISE_SCALE_MIN``."""
        return nn.functional.softplus(self.unconstrained_noise) + NOISE_SCALE_MIN

    def set_noise_scale(self, scale: torch.Tensor) -> None:
        scale = torch.as_tensor(scale, dtype=self.theta.dtype, device=self.theta.device)
        excess = (scale - NOISE_SCALE_MIN).clamp_min(1e-6)
        with torch.no_grad():  # inverse softplus, stable for large values
            self.unconstrained_noise.copy_(excess + torch.log(-torch.expm1(-excess)))

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:math:`f(t; \\theta)` for ``theta`` of shape (..., P) and grid ``t`` (T,): (..., T)."""
        raise NotImplementedError

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Per-cluster mean curves, (K, T)."""
        return self.expected_curve(self.theta, t)

    # ---- closed form (linear-in-theta experts only) ---------------------------------------
    @property
    def is_linear(self) -> bool:
        return type(self).design_matrix is not PhysicsExpert.design_matrix

    def design_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """:math:`\\Phi(t)` of shape (T, P) with :math:`f(t;\\theta) = \\Phi\\theta`."""
        raise NotImplementedError(f"{type(self).__name__} is not linear in theta")


def weighted_least_squares(
    design: torch.Tensor,
    curves: torch.Tensor,
    weights: torch.Tensor,
    ridge: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The EM M-step for a linear expert, all clusters at once.

    Args:
        design: :math:`\Phi`, (T, P).
        curves: observed :math:`y_n`, (N, T).
        weights: responsibilities :math:`r_{nc}`, (N, K), non-negative.
        ridge: Tikhonov term added to :math:`\Phi^\top\Phi` (scaled by its trace) for
            rank-deficient designs; negligible otherwise.

    Returns:
        ``theta`` (K, P) and the weighted residual variance per cluster ``s2`` (K,).
    """
    weight_sum = weights.sum(0)  # (K,)
    safe_sum = weight_sum.clamp_min(torch.finfo(curves.dtype).tiny)
    mean_curves = (weights.T @ curves) / safe_sum[:, None]  # (K, T)
    gram = design.T @ design
    gram = gram + ridge * torch.trace(gram) / gram.shape[0] * torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device
    )
    theta = torch.linalg.solve(gram, design.T @ mean_curves.T).T  # (K, P)
    fitted = theta @ design.T  # (K, T)
    sq_resid = ((curves[:, None, :] - fitted[None]) ** 2).sum(-1)  # (N, K)
    s2 = (weights * sq_resid).sum(0) / (safe_sum * curves.shape[-1])
    return theta, s2


class Polynomial(PhysicsExpert):
    r""":math:`f(t; \theta_c) = \sum_{j=0}^{d} \theta_{cj} t^j` (the seed's Exercise 1)."""

    def __init__(self, degree: int) -> None:
        if not isinstance(degree, int) or degree < 0:
            raise ValueError(f"Polynomial: degree must be an integer >= 0, got {degree!r}")
        self.degree = degree
        self.param_names = tuple(f"c{j}" for j in range(degree + 1))
        super().__init__()

    def design_matrix(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t**j for j in range(self.degree + 1)], dim=-1)

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return theta @ self.design_matrix(t).T


class Affine(PhysicsExpert):
    r""":math:`f(t; a_c, b_c) = a_c t + b_c`."""

    param_names = ("slope", "intercept")

    def design_matrix(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t, torch.ones_like(t)], dim=-1)

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return theta[..., :1] * t + theta[..., 1:2]


class LinearThroughOrigin(PhysicsExpert):
    r""":math:`f(t; a_c) = a_c t` (the seed's toy: :math:`x_2 = Z t + \text{noise}`)."""

    param_names = ("slope",)

    def design_matrix(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None]

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return theta[..., :1] * t


def gaussian_curve_log_likelihood(
    curves: torch.Tensor, means: torch.Tensor, noise_scale: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log \mathcal N(y_n; f_c, s_c^2 I)` for every sample and cluster: (N, K).

    ``curves`` (N, T), ``means`` (K, T), ``noise_scale`` (K,).
    """
    num_points = curves.shape[-1]
    sq = ((curves[:, None, :] - means[None]) ** 2).sum(-1)
    var = noise_scale**2
    return -0.5 * sq / var - 0.5 * num_points * (math.log(2 * math.pi) + torch.log(var))
