"""Importance-sampled marginal log-likelihoods against the closed form of a linear-Gaussian
PIMA, and the export's log-likelihood group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pima_pyro.data import Batch
from pima_pyro.inference.marginal import pointwise_log_likelihood
from pima_pyro.models.experts import Affine
from pima_pyro.models.modalities import GaussianModality, PhysicsModality
from pima_pyro.models.module import PIMAModule

SCALE = 0.4  # observation sd of the linear-Gaussian data modality


class WideEncoder(nn.Module):
    """q(z | x) = N(0, 4 I) whatever x: a proposal wider than every component, so the
    importance weights have finite variance."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = x.new_zeros(x.shape[0], 2)
        return zeros, zeros + math.log(4.0)


def linear_gaussian_module(seed: int = 0) -> PIMAModule:
    """K = 2, D = 2: x | z ~ N(W z + b, SCALE^2 I) with a linear decoder; y an affine expert."""
    torch.manual_seed(seed)
    specs = {
        "x": GaussianModality(shape=(3,), scale=SCALE, hidden=(8,)),
        "y": PhysicsModality(shape=(5,), expert=Affine(), hidden=(8,)),
    }
    net = PIMAModule(specs, n_clusters=2, latent_dim=2, prior_expert=False).double()
    net.modalities["x"].decoder = nn.Linear(2, 3).double()
    net.modalities["x"].encoder = WideEncoder()
    with torch.no_grad():
        net.mixture.set_parameters(
            torch.tensor([0.3, 0.7]),
            torch.tensor([[-1.5, 0.5], [1.0, -0.5]]),
            torch.tensor([[0.6, 0.9], [0.8, 0.5]]),
        )
        net.modalities["y"].expert.set_theta(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
        net.modalities["y"].expert.set_noise_scale(torch.tensor([0.5, 0.7]))
    return net


def exact_log_marginals(net: PIMAModule, x: torch.Tensor, y: torch.Tensor):
    """log p(x), log p(y), log p(x, y) in closed form: x | c ~ N(W mu_c + b, W S_c W' + s^2 I)."""
    decoder = net.modalities["x"].decoder
    w, b = decoder.weight.detach(), decoder.bias.detach()
    mix = net.mixture
    log_pi = mix.log_weights.detach()
    log_px_c = []
    for c in range(2):
        cov = w @ torch.diag(mix.scale[c].detach() ** 2) @ w.T + SCALE**2 * torch.eye(3)
        mvn = torch.distributions.MultivariateNormal(w @ mix.loc[c].detach() + b, cov)
        log_px_c.append(mvn.log_prob(x))
    log_px_c = torch.stack(log_px_c, -1)  # (N, K)
    log_py_c = net.modalities["y"].cluster_log_likelihood(y).detach()
    lse = torch.logsumexp
    return (
        lse(log_pi + log_px_c, -1),
        lse(log_pi + log_py_c, -1),
        lse(log_pi + log_px_c + log_py_c, -1),
    )


def test_importance_sampled_marginals_match_closed_form_within_three_se():
    net = linear_gaussian_module()
    gen = torch.Generator().manual_seed(0)
    n = 12
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 1.5
    y = torch.randn(n, 5, generator=gen, dtype=torch.float64) + 1.0
    ones = torch.ones(n, dtype=torch.bool)
    batch = Batch({"x": x, "y": y}, {"x": ones, "y": ones}, torch.arange(n), n)
    draws = {k: v[None] for k, v in net.point_globals().items()}
    with torch.no_grad():
        est, se = pointwise_log_likelihood(net, batch, draws, ["x", "y"], 4096, gen)
        exact_x, exact_y, exact_xy = exact_log_marginals(net, x, y)
    for name, exact in (("x", exact_x), ("total", exact_xy)):
        err = (est[name][0] - exact).abs()
        assert (se[name][0] > 0).all() and (se[name][0] < 0.2).all(), name
        assert (err <= 3 * se[name][0]).all(), (name, err, se[name][0])
    torch.testing.assert_close(est["y"][0], exact_y)  # physics alone: exact
    assert (se["y"] == 0).all()


def test_standard_error_shrinks_like_one_over_root_draws():
    net = linear_gaussian_module()
    n = 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.bool)
    batch = Batch({"x": x}, {"x": ones}, torch.arange(n), n)
    draws = {k: v[None] for k, v in net.point_globals().items()}
    with torch.no_grad():
        _, se_small = pointwise_log_likelihood(net, batch, draws, ["x"], 256, gen)
        _, se_large = pointwise_log_likelihood(net, batch, draws, ["x"], 4096, gen)
    ratio = float((se_small["x"] / se_large["x"]).median())
    assert ratio == pytest.approx(math.sqrt(4096 / 256), rel=0.3)


def test_missing_modalities_contribute_nothing_and_physics_only_rows_are_exact():
    net = linear_gaussian_module()
    gen = torch.Generator().manual_seed(2)
    n = 6
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x_obs = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    y_obs = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    batch = Batch({"x": x, "y": y}, {"x": x_obs, "y": y_obs}, torch.arange(n), n)
    draws = {k: v[None] for k, v in net.point_globals().items()}
    with torch.no_grad():
        est, _ = pointwise_log_likelihood(net, batch, draws, ["x", "y"], 64, gen)
        _, exact_y, _ = exact_log_marginals(net, x, y)
    assert float(est["total"][0, 3]) == 0.0  # nothing observed
    assert float(est["x"][0, 2]) == 0.0 and float(est["y"][0, 1]) == 0.0
    rows = (~x_obs) & y_obs  # physics only: the exact marginal over c, no sampling
    torch.testing.assert_close(est["total"][0, rows], exact_y[rows])
    np.testing.assert_array_equal(est["total"][0, ~rows & ~x_obs & ~y_obs].numpy(), 0.0)
