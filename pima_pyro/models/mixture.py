r"""Gaussian-mixture prior on the latent.

.. math::

    c \sim \mathrm{Categorical}(\pi), \qquad
    z \mid c \sim \mathcal N(\mu_c, \operatorname{diag}\sigma_c^2)

Parameters are kept unconstrained (``logits`` for :math:`\pi`, softplus for :math:`\sigma_c`
above the floor ``SCALE_MIN``) so that Adam can move them freely.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

#: Floor on each mixture component's standard deviation.
SCALE_MIN: float = 1e-2


def marginalize_clusters(log_joint: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \sum_c \exp a_c` over the last dim (K): the exact sum over the cluster.

    Every path that sums ``c`` out by hand (EM, the closed-form objective, queries, the export)
    calls this; the Pyro model leaves it to ``TraceEnum_ELBO``.
    """
    return torch.logsumexp(log_joint, dim=-1)


def cluster_log_posterior_from_joint(log_joint: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p(c \mid \cdot) = a_c - \log\sum_{c'} \exp a_{c'}` over the last dim."""
    return log_joint - marginalize_clusters(log_joint).unsqueeze(-1)


#: :math:`\\log\\pi_c` of a cluster removed from the mixture (:attr:`GaussianMixturePrior.active`):
#: its weight is exactly 0 in float arithmetic, yet no -inf reaches a sum or a product.
EMPTY_LOG_WEIGHT: float = -1e4


def restrict_to_active(log_weights: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """Log-weights (..., K) renormalised over the ``active`` clusters (K,) bool; the others get
    :data:`EMPTY_LOG_WEIGHT` (before renormalising). ``active=None`` renormalises only."""
    if active is not None:
        log_weights = torch.where(active, log_weights, EMPTY_LOG_WEIGHT)
    return cluster_log_posterior_from_joint(log_weights)


def log_weights_of(pi: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`\\log\\pi` of mixture weights on the simplex, floored at the dtype's smallest
    positive number so that an empty component gives a large negative number, never -inf;
    restricted to the ``active`` clusters when given (:func:`restrict_to_active`)."""
    log_pi = torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny))
    return log_pi if active is None else restrict_to_active(log_pi, active)


def log_mean_exp(log_values: torch.Tensor, dim: int) -> torch.Tensor:
    r""":math:`\log \frac1S \sum_s \exp v_s` over ``dim`` (Monte-Carlo averages in log space)."""
    return torch.logsumexp(log_values, dim=dim) - math.log(log_values.shape[dim])


def expected_normal_log_prob(
    loc: torch.Tensor, var: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    r""":math:`\mathbb E_{\mathcal N(z; m, \operatorname{diag} v)} \log \mathcal N(z; \mu_c,
    \sigma_c^2) = -\tfrac12 \sum_d [\log 2\pi\sigma_{cd}^2 + (v_d + (m_d - \mu_{cd})^2) /
    \sigma_{cd}^2]` for ``loc``/``var`` (N, D) and components ``mu``/``sigma`` (K, D): (N, K)."""
    sigma2 = sigma**2
    return -0.5 * (
        torch.log(2 * math.pi * sigma2)[None]
        + (var[:, None, :] + (loc[:, None, :] - mu[None]) ** 2) / sigma2[None]
    ).sum(-1)


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class GaussianMixturePrior(nn.Module):
    """K components in D dimensions with learnable weights, means and diagonal scales."""

    def __init__(self, n_clusters: int, latent_dim: int) -> None:
        super().__init__()
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.logits = nn.Parameter(torch.zeros(n_clusters))
        # clusters the start found surplus (``initialize_from_physics``) are inactive: weight 0
        self.register_buffer("active", torch.ones(n_clusters, dtype=torch.bool))
        # spread the means so that the first E-step is not symmetric
        self.loc = nn.Parameter(torch.randn(n_clusters, latent_dim))
        self.unconstrained_scale = nn.Parameter(
            _inverse_softplus(torch.full((n_clusters, latent_dim), 1.0 - SCALE_MIN))
        )

    @property
    def log_weights(self) -> torch.Tensor:
        """:math:`\\log\\pi` (K,); inactive clusters get weight 0 (:func:`restrict_to_active`)."""
        return restrict_to_active(self.logits, self.active)

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights :math:`\\pi` (K,)."""
        return self.log_weights.exp()

    @property
    def scale(self) -> torch.Tensor:
        """Component standard deviations :math:`\\sigma_c` (K, D)."""
        return nn.functional.softplus(self.unconstrained_scale) + SCALE_MIN

    @torch.no_grad()
    def set_parameters(self, weights: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Overwrite :math:`\\pi, \\mu, \\sigma` (e.g. from an EM or GMM initialisation)."""
        p = self.logits
        weights = torch.as_tensor(weights, dtype=p.dtype, device=p.device).clamp_min(1e-6)
        self.logits.copy_(torch.log(weights / weights.sum()))
        self.loc.copy_(torch.as_tensor(loc, dtype=p.dtype, device=p.device))
        scale = torch.as_tensor(scale, dtype=p.dtype, device=p.device)
        self.unconstrained_scale.copy_(_inverse_softplus((scale - SCALE_MIN).clamp_min(1e-4)))

    def expected_component_log_prob(self, loc: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathbb E_{\mathcal N(z; m, \operatorname{diag} v)} \log \mathcal N(z; \mu_c,
        \sigma_c^2) = -\tfrac12 \sum_d [\log 2\pi\sigma_{cd}^2 + (v_d + (m_d - \mu_{cd})^2) /
        \sigma_{cd}^2]` in closed form, for ``loc``/``var`` (N, D): (N, K)."""
        return expected_normal_log_prob(loc, var, self.loc, self.scale)

    def component(self, c: torch.Tensor | None = None) -> dist.Distribution:
        r""":math:`p(z \mid c) = \mathcal N(\mu_c, \operatorname{diag}\sigma_c^2)`, event shape
        (D,); with ``c=None`` a batch over all K components. The one definition of the latent
        prior's density (the Pyro model and every query call it)."""
        loc, scale = self.loc, self.scale
        if c is not None:
            loc, scale = loc[c], scale[c]
        return dist.Normal(loc, scale).to_event(1)

    def component_log_prob(
        self, z: torch.Tensor, log_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        r""":math:`\log \pi_c + \log \mathcal N(z; \mu_c, \sigma_c^2)` for z (..., D): (..., K).

        ``log_weights`` replaces :math:`\log\pi` (e.g. a posterior mean under Bayesian globals).
        """
        if log_weights is None:
            log_weights = self.log_weights
        return log_weights + self.component().log_prob(z.unsqueeze(-2))
