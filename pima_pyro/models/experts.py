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
import numbers
from collections.abc import Callable, Mapping
from functools import partial

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import biject_to, constraints

#: Floor on the per-cluster noise scale of an expert (relative floors are the caller's choice).
NOISE_SCALE_MIN: float = 1e-3

#: Standard deviation of the default prior on every entry of theta.
DEFAULT_PRIOR_SCALE: float = 10.0


def default_theta_prior(
    shape: tuple[int, ...], like: torch.Tensor | None = None
) -> dist.Distribution:
    r"""The default prior on expert parameters: independent :math:`\mathcal N(0, 10^2)` over
    ``shape`` (all dims are event dims), on the device and dtype of ``like``."""
    zeros = torch.zeros(
        shape,
        device=None if like is None else like.device,
        dtype=None if like is None else like.dtype,
    )
    return dist.Normal(zeros, DEFAULT_PRIOR_SCALE + zeros).to_event(len(shape))


class IsotropicCurveNormal(dist.TorchDistribution):
    r""":math:`\mathcal N(y; f, s^2 I_T)` over a curve of T points with one scale per curve.

    .. math::

        \log p(y) = -\frac{\lVert y - f\rVert^2}{2 s^2} - T \log s - \frac T2 \log 2\pi

    Same density as ``Normal(f, s).to_event(1)``; the squared norm is taken before the
    per-curve terms, which halves the work in the (draws, clusters, samples, T) tensors that
    enumeration and NUTS evaluate.
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None) -> None:
        self.loc = loc
        self.scale = scale
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape)
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> IsotropicCurveNormal:
        batch_shape = torch.Size(batch_shape)
        return IsotropicCurveNormal(
            self.loc.expand(batch_shape + self.event_shape), self.scale.expand(batch_shape)
        )

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        return (self.scale**2).unsqueeze(-1).expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale.unsqueeze(-1) * eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        num_points = self.event_shape[0]
        sq = ((value - self.loc) ** 2).sum(-1)
        return (
            -0.5 * sq / self.scale**2
            - num_points * torch.log(self.scale)
            - 0.5 * num_points * math.log(2 * math.pi)
        )


def _unit_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """Per-coordinate units for optimisation: the magnitude, floored at 1e-3 of the largest;
    1 where everything is 0 (a start at the origin must still be able to move)."""
    largest = float(magnitude.max()) if magnitude.numel() else 0.0
    if largest == 0.0:
        return torch.ones_like(magnitude)
    return magnitude.clamp_min(1e-3 * largest)


def curve_likelihood(means: torch.Tensor, noise_scale: torch.Tensor) -> dist.Distribution:
    r"""The physics likelihood :math:`\mathcal N(y; f, s^2 I)` of a curve: the one definition
    that the Pyro model, EM, the closed-form objective, queries, export and MCMC all use.

    ``means`` (..., T), ``noise_scale`` (...); event shape (T,).
    """
    return IsotropicCurveNormal(means, noise_scale)


def cluster_log_likelihood(
    curves: torch.Tensor, means: torch.Tensor, noise_scale: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log \mathcal N(y_n; f_c, s_c^2 I)` for every sample and cluster: (..., N, K).

    ``curves`` (N, T), ``means`` (..., K, T), ``noise_scale`` (..., K); leading dims (e.g. draws
    of the globals) broadcast. Evaluates :func:`curve_likelihood`.
    """
    likelihood = curve_likelihood(means.unsqueeze(-3), noise_scale.unsqueeze(-2))
    return likelihood.log_prob(curves.unsqueeze(-2))


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

    @property
    def user_start_mask(self) -> torch.Tensor:
        """(P,) bool: the entries of theta whose start the user gave (none for built-in
        experts); :func:`data_start` never changes them."""
        return torch.zeros(self.num_params, dtype=torch.bool)

    def bind(self, n_clusters: int) -> PhysicsExpert:
        """Create the per-cluster parameters for ``n_clusters`` clusters."""
        self.n_clusters = n_clusters
        self.theta_unit = nn.Parameter(torch.zeros(n_clusters, self.num_params))
        self.register_buffer("theta_scale", torch.ones(self.num_params))
        self.unconstrained_noise = nn.Parameter(torch.zeros(n_clusters))
        return self

    @property
    def support(self) -> constraints.Constraint:
        """Support of one cluster's theta (event dim 1): the support of :meth:`prior`."""
        return self.prior().support

    @property
    def theta_transform(self) -> torch.distributions.Transform:
        """The bijection from unconstrained coordinates onto :attr:`support` (``biject_to``):
        the point estimate, the mean-field guide and NUTS all move in these coordinates."""
        return biject_to(self.support)

    @property
    def is_unconstrained(self) -> bool:
        """Whether every parameter is real-valued (the bijection is the identity)."""
        support = self.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        return support is constraints.real

    @property
    def theta_unconstrained(self) -> torch.Tensor:
        """Unconstrained coordinates of theta (K, P) = ``theta_unit * theta_scale``.

        Adam moves every coordinate by about its learning rate per step, whatever its scale;
        storing them in units of their magnitude (set by :meth:`set_theta`) lets a yield strain
        of 0.02 and a modulus of 200 train at the same relative speed.
        """
        return self.theta_unit * self.theta_scale

    @property
    def theta(self) -> torch.Tensor:
        """Per-cluster parameters (K, P), always inside :attr:`support`."""
        return self.theta_transform(self.theta_unconstrained)

    @torch.no_grad()
    def set_theta(self, theta: torch.Tensor) -> None:
        """Overwrite theta (K, P) and re-derive the per-parameter scale from its magnitude."""
        theta = torch.as_tensor(theta, dtype=self.theta_unit.dtype, device=self.theta_unit.device)
        if not bool(self.support.check(theta).all()):
            raise ValueError(
                f"{type(self).__name__}: theta {theta.tolist()} lies outside the support of "
                "the expert's prior"
            )
        unconstrained = self.theta_transform.inv(theta)
        scale = _unit_scale(unconstrained.abs().amax(0))
        self.theta_scale.copy_(scale)
        self.theta_unit.copy_(unconstrained / scale)

    @property
    def noise_scale(self) -> torch.Tensor:
        """Per-cluster noise standard deviation ``s_c`` (K,), floored at ``NOISE_SCALE_MIN``."""
        return nn.functional.softplus(self.unconstrained_noise) + NOISE_SCALE_MIN

    def set_noise_scale(self, scale: torch.Tensor) -> None:
        p = self.unconstrained_noise
        scale = torch.as_tensor(scale, dtype=p.dtype, device=p.device)
        excess = (scale - NOISE_SCALE_MIN).clamp_min(1e-6)
        with torch.no_grad():  # inverse softplus, stable for large values
            self.unconstrained_noise.copy_(excess + torch.log(-torch.expm1(-excess)))

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:math:`f(t; \\theta)` for ``theta`` of shape (..., P) and grid ``t`` (T,): (..., T)."""
        raise NotImplementedError

    def curve_jacobian(self, unconstrained: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\partial f(t; T(u_c)) / \partial u_c` (K, T, P) for each row :math:`u_c` of
        ``unconstrained`` (K, P), :math:`T` = :attr:`theta_transform`: the one derivative the
        Laplace scales, the unmoved-parameter check and the physics information gain use."""
        with torch.enable_grad():
            return torch.stack(
                [
                    torch.autograd.functional.jacobian(
                        partial(_curve_of_unconstrained, self, t), u.detach()
                    )
                    for u in unconstrained
                ]
            )

    def guide_theta_sd(self) -> torch.Tensor:
        """Standard deviations (K, P) of the mean-field guide of theta in unconstrained
        coordinates (only under Bayesian globals, which create ``q_theta_log_sd``)."""
        return torch.exp(self.q_theta_log_sd) * self.theta_scale

    def prior(self) -> dist.Distribution:
        """Prior on one cluster's theta, event shape (P,), for Bayesian globals and MCMC.

        Default: independent :math:`\\mathcal N(0, 10^2)`, weak on the scale of typical curves.
        """
        return default_theta_prior((self.num_params,), getattr(self, "theta_unit", None))

    def initial_theta(self, mean_curves: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Data-driven start for theta (K, P) from each cluster's mean curve (K, T).

        Linear experts solve least squares; others keep, for each curve, the best of
        :func:`start_candidates` (:func:`best_candidates`). Experts with a closed-form
        heuristic add it to the candidates by overriding :meth:`heuristic_theta`.
        """
        if self.is_linear:
            design = self.design_matrix(t).to(mean_curves)
            return torch.linalg.lstsq(design, mean_curves.T).solution.T
        candidates = start_candidates(self, mean_curves.dtype, mean_curves.device)
        heuristic = self.heuristic_theta(mean_curves, t)
        if heuristic is not None:
            candidates = torch.cat([candidates, heuristic.to(candidates)])
        return best_candidates(self, mean_curves, t, candidates)

    def heuristic_theta(self, curves: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """Optional closed-form guesses of theta (N, P) for curves (N, T); ``None`` if none."""
        return None

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


def _curve_of_unconstrained(
    expert: PhysicsExpert, grid: torch.Tensor, unconstrained: torch.Tensor
) -> torch.Tensor:
    return expert.expected_curve(expert.theta_transform(unconstrained), grid)


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
    return theta, weighted_residual_variance(curves, theta @ design.T, weights)


def weighted_residual_variance(
    curves: torch.Tensor, fitted: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    r"""The M-step noise: :math:`s_c^2 = \sum_n r_{nc} \lVert y_n - f_c\rVert^2 /
    (T \sum_n r_{nc})` for ``curves`` (N, T), ``fitted`` (K, T), ``weights`` (N, K): (K,)."""
    weight_sum = weights.sum(0).clamp_min(torch.finfo(curves.dtype).tiny)
    sq_resid = ((curves[:, None, :] - fitted[None]) ** 2).sum(-1)  # (N, K)
    return (weights * sq_resid).sum(0) / (weight_sum * curves.shape[-1])


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


def fit_weighted_nonlinear(
    expert: PhysicsExpert,
    t: torch.Tensor,
    curves: torch.Tensor,
    weights: torch.Tensor,
    theta_init: torch.Tensor,
    steps: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The M-step of a non-linear expert: :math:`\arg\min_\theta \sum_n r_{nc}
    \lVert y_n - f(t; \theta_c)\rVert^2` for all clusters at once by L-BFGS from ``theta_init``.

    Only the weighted mean curve and total weight per cluster enter (the weighted sum of squares
    equals :math:`W_c \lVert \bar y_c - f\rVert^2` plus a constant), so the cost is O(K T).
    Returns ``theta`` (K, P) and the weighted residual variance ``s2`` (K,).
    """
    weight_sum = weights.sum(0).clamp_min(torch.finfo(curves.dtype).tiny)
    mean_curves = (weights.T @ curves) / weight_sum[:, None]
    theta = least_squares_fit(expert, t, mean_curves, weight_sum, theta_init, steps)
    return theta, weighted_residual_variance(curves, expert.expected_curve(theta, t), weights)


def least_squares_fit(
    expert: PhysicsExpert,
    t: torch.Tensor,
    curves: torch.Tensor,
    weights: torch.Tensor,
    theta_init: torch.Tensor,
    steps: int = 100,
) -> torch.Tensor:
    r""":math:`\arg\min_\theta \sum_i w_i \lVert y_i - f(t; \theta_i)\rVert^2` for curves
    (I, T) with one theta (I, P) each, by one L-BFGS from ``theta_init`` (the sum is separable,
    so every curve gets its own least-squares fit). The one non-linear least-squares solve:
    the EM M-step (rows = clusters' mean curves) and per-curve start estimates call it."""
    # optimise in the unconstrained coordinates of the prior's support, divided by their start
    # magnitude so that parameters of very different size (a modulus of 1e2 beside a yield
    # strain of 1e-2) are equally well conditioned
    transform = expert.theta_transform
    start = transform.inv(theta_init.detach())
    magnitude = _unit_scale(start.abs())
    unit = (start / magnitude).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([unit], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    scale = curves.pow(2).mean().clamp_min(1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        resid = curves - expert.expected_curve(transform(unit * magnitude), t)
        loss = (weights[:, None] * resid**2).sum() / (weights.sum() * scale)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    theta = transform(unit * magnitude).detach()
    finite = torch.isfinite(theta).all(-1, keepdim=True)
    return torch.where(finite, theta, theta_init.detach())


#: Shrink factors applied to prior draws (in unconstrained coordinates) by
#: :func:`start_candidates`: a broad prior alone would rarely propose a value near the data's scale.
START_SHRINKS: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03)


def start_candidates(
    expert: PhysicsExpert,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    n_draws: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    r"""Candidate starts (S, P) inside the support: ``n_draws`` prior draws :math:`u_s` in
    unconstrained coordinates, each also shrunk towards the origin by :data:`START_SHRINKS`
    (the prior's scale need not be the data's), plus the origin and the expert's current theta
    (a user's ``init``). Deterministic for a given ``seed``; the global RNG is untouched."""
    transform = expert.theta_transform
    prior = expert.prior()
    ref = getattr(expert, "theta_unit", None)  # the prior follows the bound module's device
    devices = [ref.device] if ref is not None and ref.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # CUDA's stream too when the prior lives there
        torch.manual_seed(seed)
        draws = prior.sample((n_draws,)).to(dtype=dtype, device="cpu")
    unconstrained = transform.inv(draws).to(device)
    shrunk = [unconstrained * f for f in START_SHRINKS]
    shrunk.append(torch.zeros(1, expert.num_params, dtype=dtype, device=device))
    if hasattr(expert, "theta_unit"):  # bound: the current theta (a user's init) competes too
        shrunk.append(expert.theta_unconstrained.detach().to(dtype=dtype, device=device))
    return transform(torch.cat(shrunk))


def data_start(
    expert: PhysicsExpert, mean_curve: torch.Tensor, t: torch.Tensor
) -> torch.Tensor | None:
    r"""The start (P,) for a law not finite at the default start (a width or a denominator
    at 0): of :func:`start_candidates`, with the entries the user gave
    (:attr:`PhysicsExpert.user_start_mask`) held at the current theta, the one whose curve on
    ``t`` is nearest ``mean_curve`` (T,) (:func:`candidate_errors`); ``None`` when no
    candidate's curve is finite. In ``t``'s dtype and device."""
    with torch.no_grad():
        candidates = start_candidates(expert, t.dtype, t.device)
        given = expert.user_start_mask.to(t.device)
        candidates = torch.where(given, expert.theta.detach()[0].to(candidates), candidates)
        error = candidate_errors(expert, mean_curve[None].to(t), t, candidates)[0]
        return candidates[error.argmin()] if bool(torch.isfinite(error).any()) else None


def candidate_errors(
    expert: PhysicsExpert, curves: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    r""":math:`\lVert y_n - f(t; \theta_s)\rVert^2 - \lVert y_n \rVert^2` (N, S) for curves
    (N, T) and candidates (S, P); ``inf`` where a candidate's curve is not finite. One matrix
    product, so S in the thousands is cheap."""
    with torch.no_grad():
        fitted = expert.expected_curve(candidates, t.to(candidates))  # (S, T)
        fitted = fitted.to(curves)
        finite = torch.isfinite(fitted).all(-1)
        fitted = torch.where(finite[:, None], fitted, torch.zeros_like(fitted))
        sq_error = (fitted**2).sum(-1)[None] - 2 * curves @ fitted.T
        return torch.where(finite[None], sq_error, torch.full_like(sq_error, float("inf")))


def best_candidates(
    expert: PhysicsExpert, curves: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    r"""For each curve (N, T) the candidate (S, P) of least squared error
    :math:`\lVert y_n - f(t; \theta_s)\rVert^2`, (N, P) (:func:`candidate_errors`);
    candidates whose curve is not finite are skipped."""
    return candidates.to(curves)[candidate_errors(expert, curves, t, candidates).argmin(-1)]


class ExponentialDecay(PhysicsExpert):
    r""":math:`f(t; A_c, k_c, C_c) = A_c e^{-k_c t} + C_c` (relaxation, decay of a signal).

    The rate is parametrised as :math:`k = \mathrm{softplus}(\kappa)` so that it stays positive;
    ``theta = (A, kappa, C)``.
    """

    param_names = ("amplitude", "rate_unconstrained", "offset")

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rate = nn.functional.softplus(theta[..., 1:2])
        return theta[..., :1] * torch.exp(-rate * t) + theta[..., 2:3]

    @staticmethod
    def rate(theta: torch.Tensor) -> torch.Tensor:
        """The decay rate :math:`k` (positive) from theta (..., 3)."""
        return nn.functional.softplus(theta[..., 1])

    def heuristic_theta(self, mean_curves: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # offset from the tail, then a log-linear fit of the head for A and k
        t = t.to(mean_curves)
        offset = mean_curves[:, -1:]
        head = mean_curves - offset
        amplitude = head[:, :1]
        ratio = head / amplitude.where(amplitude.abs() > 1e-12, torch.ones_like(amplitude))
        ratio = ratio.clamp(1e-3, 1.0)
        span = (t[-1] - t[0]).clamp_min(1e-12)
        half = t.shape[0] // 2
        rate = (-torch.log(ratio[:, half]) / (t[half] - t[0]).clamp_min(1e-12)).clamp(
            0.1 / span, 50.0 / span
        )
        kappa = rate + torch.log(-torch.expm1(-rate))  # inverse softplus
        return torch.stack([amplitude[:, 0], kappa, offset[:, 0]], dim=-1)


class BilinearStressStrain(PhysicsExpert):
    r"""Elastic-plastic stress-strain curve, continuous at the yield point:

    .. math::

        f(\varepsilon) = E\,\varepsilon + (H - E)\, \rho_\beta(\varepsilon - \varepsilon_y),
        \qquad \rho_\beta(u) = \tfrac1\beta \log(1 + e^{\beta u}),

    i.e. slope :math:`E` (elastic) up to the yield strain :math:`\varepsilon_y`, slope :math:`H`
    (hardening) after it. :math:`\rho_\beta` is a softplus that tends to :math:`\max(u, 0)` as
    :math:`\beta \to \infty`; with :math:`\beta` finite the curve is smooth, so gradients in the
    yield point exist everywhere (:math:`\partial f / \partial\varepsilon_y = -(H - E)
    \sigma(\beta(\varepsilon - \varepsilon_y))`). ``sharpness`` is :math:`\beta` times the grid
    span (default 200: the kink is rounded over 0.5% of the grid). ``theta = (E, eps_y, H)``.
    """

    param_names = ("elastic_modulus", "yield_strain", "hardening_modulus")

    def __init__(self, sharpness: float = 200.0) -> None:
        super().__init__()
        if sharpness <= 0:
            raise ValueError(f"BilinearStressStrain: sharpness must be > 0, got {sharpness}")
        self.sharpness = sharpness

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        span = (t[-1] - t[0]).clamp_min(1e-12)
        beta = self.sharpness / span
        elastic, yield_strain, hardening = theta[..., :1], theta[..., 1:2], theta[..., 2:3]
        plastic = nn.functional.softplus(beta * (t - yield_strain)) / beta
        return elastic * t + (hardening - elastic) * plastic

    def heuristic_theta(self, mean_curves: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # try every grid point as the kink, keep the best two-slope least-squares fit
        t = t.to(mean_curves)
        best_err = torch.full((mean_curves.shape[0],), float("inf"), dtype=t.dtype, device=t.device)
        best = torch.zeros(mean_curves.shape[0], 3, dtype=t.dtype, device=t.device)
        for j in range(2, t.shape[0] - 2):
            ey = t[j]
            design = torch.stack([t.clamp(max=ey), (t - ey).clamp(min=0)], dim=-1)
            sol = torch.linalg.lstsq(design, mean_curves.T).solution.T  # (K, 2): E, H
            err = ((mean_curves - sol @ design.T) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            cand = torch.stack([sol[:, 0], ey.expand(sol.shape[0]), sol[:, 1]], dim=-1)
            best = torch.where(better[:, None], cand, best)
        return best


class Custom(PhysicsExpert):
    r"""Any torch function :math:`f(t; \theta)` of named parameters.

    Args:
        fn: ``fn(t, **params) -> (..., T)`` where each ``params[name]`` has shape
            ``(..., *param_shapes[name])`` and ``t`` has shape (T,). Use broadcasting against
            ``t`` (e.g. ``params["a"] * t`` with ``a`` of shape (..., 1)).
        param_shapes: ``name -> shape`` of each parameter; a scalar is ``(1,)``.
        priors: optional ``name -> Distribution`` with event shape ``param_shapes[name]``
            (default: :math:`\mathcal N(0, 10^2)` on every entry). A constrained prior (e.g.
            ``LogNormal`` for a positive parameter) constrains that parameter everywhere: the
            point estimate, the mean-field guide and NUTS move in ``biject_to(support)``
            coordinates, so the parameter never leaves its support. Supports must be
            elementwise (real, positive, an interval, ...).
        init: optional ``name -> tensor`` start (default: the image of 0 under the support's
            bijection: 0 for real, 1 for positive parameters). Where the law is not finite
            at the start, ``PIMA.build``/``fit`` start the parameters not in ``init`` at
            :func:`data_start`.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        param_shapes: Mapping[str, tuple[int, ...]],
        priors: Mapping[str, dist.Distribution] | None = None,
        init: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"Custom: fn must be callable, got {type(fn).__name__}")
        if not param_shapes:
            raise ValueError("Custom: param_shapes must name at least one parameter")
        self.fn = fn
        self.param_shapes = {k: _checked_shape(k, v) for k, v in param_shapes.items()}
        empty = [k for k, v in self.param_shapes.items() if math.prod(v) == 0]
        if empty:
            raise ValueError(f"Custom: parameters {empty} have zero size; every shape needs >= 1")
        self.sizes = {k: math.prod(v) for k, v in self.param_shapes.items()}
        self.param_names = tuple(
            name if self.sizes[name] == 1 else f"{name}[{i}]"
            for name in self.param_shapes
            for i in range(self.sizes[name])
        )
        self.priors = dict(priors or {})
        unknown = set(self.priors) - set(self.param_shapes)
        if unknown:
            raise ValueError(f"Custom: priors name unknown parameters {sorted(unknown)}")
        for name, prior in self.priors.items():
            if not isinstance(prior, torch.distributions.Distribution):
                raise TypeError(
                    f"Custom: priors['{name}'] must be a torch/Pyro Distribution, got "
                    f"{type(prior).__name__}"
                )
            if tuple(prior.batch_shape) + tuple(prior.event_shape) != self.param_shapes[name]:
                raise ValueError(
                    f"Custom: priors['{name}'] has shape {tuple(prior.batch_shape)} + "
                    f"{tuple(prior.event_shape)}; parameter '{name}' has shape "
                    f"{self.param_shapes[name]} (use .to_event() for the event dims)"
                )
            _elementwise_support(name, prior)
        self.init = _checked_init(init or {}, self.param_shapes)
        super().__init__()

    def unpack(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split theta (..., P) into the named parameters with their shapes."""
        out, start = {}, 0
        for name, shape in self.param_shapes.items():
            size = self.sizes[name]
            out[name] = theta[..., start : start + size].reshape(*theta.shape[:-1], *shape)
            start += size
        return out

    def expected_curve(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        curves = self.fn(t, **self.unpack(theta))
        if not isinstance(curves, torch.Tensor):
            raise TypeError(
                f"Custom: fn must return a torch.Tensor, got {type(curves).__name__} (use torch "
                "operations on t and the parameters, not numpy)"
            )
        return curves.to(t.dtype)  # a float64 constant inside fn must not promote the model

    def prior(self) -> dist.Distribution:
        if not self.priors:
            return super().prior()
        return _ConcatenatedPrior(self)

    def bind(self, n_clusters: int) -> Custom:
        super().bind(n_clusters)
        if self.init:
            start = self.default_theta()
            for name, value in self.unpack(start).items():
                part = _ConcatenatedPrior(self)._part(name) if self.priors else None
                if part is not None and not bool(part.support.check(value).all()):
                    raise ValueError(
                        f"Custom: init['{name}'] = {value.tolist()} lies outside the support "
                        f"of its prior ({_elementwise_support(name, part)})"
                    )
            self.set_theta(start.expand(n_clusters, -1))
        return self

    @property
    def user_start_mask(self) -> torch.Tensor:
        """(P,) bool: the entries of the parameters named in ``init``."""
        return torch.cat([torch.full((self.sizes[n],), n in self.init) for n in self.param_shapes])

    def default_theta(self) -> torch.Tensor:
        """The start before any data (P,): ``init`` where given, else the image of 0 under the
        support's bijection (0 for real, 1 for positive parameters). Data-driven starts
        (:meth:`initial_theta`) search around it and around prior draws."""
        origin = self.theta_transform(torch.zeros(self.num_params))
        defaults = self.unpack(origin)
        return torch.cat(
            [self.init.get(name, defaults[name]).reshape(-1) for name in self.param_shapes]
        )


def _checked_shape(name: str, shape: object) -> tuple[int, ...]:
    """A parameter's shape as a tuple of ints; a bare number is refused by name."""
    if not isinstance(shape, tuple | list) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in shape
    ):
        raise TypeError(
            f"Custom: param_shapes['{name}'] must be a tuple of ints such as (1,) for a "
            f"scalar, got {shape!r}"
        )
    return tuple(int(n) for n in shape)


def _checked_init(
    init: Mapping[str, object], param_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """``init`` as float32 tensors, each naming a parameter and of its shape (a scalar may be
    given as a number)."""
    unknown = sorted(set(init) - set(param_shapes))
    if unknown:
        raise ValueError(
            f"Custom: init names unknown parameters {unknown}; the parameters are "
            f"{list(param_shapes)}"
        )
    out = {}
    for name, value in init.items():
        tensor = torch.as_tensor(value, dtype=torch.float32)
        if tensor.numel() != math.prod(param_shapes[name]):
            raise ValueError(
                f"Custom: init['{name}'] has shape {tuple(tensor.shape)}; parameter '{name}' "
                f"has shape {param_shapes[name]}"
            )
        out[name] = tensor.reshape(param_shapes[name])
    return out


def _elementwise_support(name: str, prior: dist.Distribution) -> constraints.Constraint:
    """The per-entry support of a named prior; refuses supports that couple entries."""
    support = prior.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support.event_dim != 0:
        raise ValueError(
            f"Custom: the prior of '{name}' has support {support}, which couples entries; "
            "use priors with an elementwise support (real, positive, an interval)"
        )
    return support


class _ConcatenatedPrior(dist.TorchDistribution):
    """Independent named priors of a :class:`Custom` expert as one distribution over (P,)."""

    arg_constraints: dict = {}

    def __init__(self, expert: Custom) -> None:
        self.expert = expert
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([expert.num_params]))

    @property
    def support(self) -> constraints.Constraint:
        parts = [_elementwise_support(n, self._part(n)) for n in self.expert.param_shapes]
        sizes = [self.expert.sizes[n] for n in self.expert.param_shapes]
        return constraints.independent(constraints.cat(parts, dim=-1, lengths=sizes), 1)

    def _part(self, name: str) -> dist.Distribution:
        prior = self.expert.priors.get(name)
        if prior is None:
            ref = getattr(self.expert, "theta_unit", None)
            prior = default_theta_prior(self.expert.param_shapes[name], ref)
        return prior

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        batch = value.shape[:-1]
        params = self.expert.unpack(value)
        return sum(self._part(n).log_prob(v).reshape(*batch, -1).sum(-1) for n, v in params.items())

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        ref = getattr(self.expert, "theta_unit", None)
        parts = [
            self._part(n).sample(sample_shape).reshape(*sample_shape, -1)
            for n in self.expert.param_shapes
        ]
        out = torch.cat(parts, dim=-1)
        # user priors are built on the CPU in float32: draws follow the module's dtype/device
        return out if ref is None else out.to(ref)
