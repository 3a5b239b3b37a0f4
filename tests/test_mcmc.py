"""NUTS on the Pyro physics model against closed-form and quadrature posteriors."""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.stats import effective_sample_size

from pima_pyro import PIMA, Custom, LinearThroughOrigin, MultimodalData, PhysicsModality
from pima_pyro.inference.mcmc import physics_nuts, relabel

NOISE = 0.5
PRIOR_SD = 10.0  # the default prior on expert parameters


def line_data(slopes, counts, points=8, seed=0) -> MultimodalData:
    rng = np.random.default_rng(seed)
    t = np.linspace(0.1, 1.0, points)
    labels = np.repeat(np.arange(len(slopes)), counts)
    y = np.asarray(slopes)[labels, None] * t + NOISE * rng.standard_normal((labels.size, points))
    return MultimodalData({"y": y}, grids={"y": t}, labels=labels)


def built(data: MultimodalData, k: int, expert) -> PIMA:
    model = PIMA({"y": PhysicsModality(expert=expert, hidden=(8,))}, n_clusters=k, latent_dim=1)
    model.build(data)
    return model


def nuts_with_known_noise(model: PIMA, data: MultimodalData, num_samples: int):
    """Two chains of NUTS on one cluster, the noise scale fixed at its true value."""
    return physics_nuts(
        model.module,
        {"y": data.values["y"]},
        num_samples=num_samples,
        warmup_steps=300,
        num_chains=2,
        condition={"noise_y": torch.full((1,), NOISE)},
    )


def conjugate_slope(y: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Posterior mean and sd of a in y = a t + N(0, NOISE^2), a ~ N(0, PRIOR_SD^2)."""
    precision = 1 / PRIOR_SD**2 + (t**2).sum() * y.shape[0] / NOISE**2
    mean = (y @ t).sum() / NOISE**2 / precision
    return mean, 1 / math.sqrt(precision)


def mc_se(draws: np.ndarray) -> float:
    """sd / sqrt(ESS) of (chains, draws) samples."""
    ess = float(effective_sample_size(torch.as_tensor(draws)[..., None]).squeeze())
    return float(draws.std()) / math.sqrt(ess)


def test_single_cluster_matches_conjugate_posterior():
    data = line_data([2.0], [40])
    model = built(data, 1, LinearThroughOrigin())
    result = nuts_with_known_noise(model, data, num_samples=400)
    draws = result.samples["theta_y"][..., 0, 0]
    mean, sd = conjugate_slope(data.values["y"].double().numpy(), data.grids["y"].double().numpy())
    assert abs(draws.mean() - mean) < 3 * mc_se(draws)
    assert draws.std() == pytest.approx(sd, rel=0.15)
    assert result.sample_stats["diverging"].sum() == 0


def test_two_separated_clusters_match_conjugate_posteriors_and_dirichlet():
    data = line_data([-4.0, 4.0], [30, 10], seed=1)
    model = built(data, 2, LinearThroughOrigin())
    result = physics_nuts(
        model.module,
        {"y": data.values["y"]},
        num_samples=400,
        warmup_steps=300,
        num_chains=2,
        seed=1,
        condition={"noise_y": torch.full((2,), NOISE)},
    )
    y = data.values["y"].double().numpy()
    t = data.grids["y"].double().numpy()
    labels = data.labels.numpy()
    for c in range(2):  # relabelled: cluster 0 has the smaller slope
        draws = result.samples["theta_y"][..., c, 0]
        mean, sd = conjugate_slope(y[labels == c], t)
        assert abs(draws.mean() - mean) < 3 * mc_se(draws)
        assert draws.std() == pytest.approx(sd, rel=0.2)
    pi0 = result.samples["pi"][..., 0]
    # assignments are certain: pi ~ Dirichlet(1 + 30, 1 + 10), mean 31/42
    assert abs(pi0.mean() - 31 / 42) < 3 * mc_se(pi0)


def power_law(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return a * t


LOGNORMAL = dist.LogNormal(torch.zeros(1), torch.full((1,), 0.5)).to_event(1)


def quadrature_posterior(y: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    grid = np.linspace(1e-4, 6.0, 60001)
    log_prior = LOGNORMAL.log_prob(torch.as_tensor(grid)[:, None]).numpy()
    resid = y[None, :, :] - grid[:, None, None] * t
    log_post = log_prior - 0.5 * (resid**2).sum((1, 2)) / NOISE**2
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = (w * grid).sum()
    return mean, math.sqrt((w * (grid - mean) ** 2).sum())


def quadrature_posterior_unknown_noise(y: np.ndarray, t: np.ndarray) -> float:
    """Posterior mean of a when the noise s ~ LogNormal(0, 2^2) is unknown too (2-D grid)."""
    a = np.linspace(1e-3, 6.0, 1200)[:, None]
    log_s = np.linspace(-5.0, 3.0, 800)[None, :]
    s = np.exp(log_s)
    log_prior_a = LOGNORMAL.log_prob(torch.as_tensor(a)).numpy()[:, None]
    # LogNormal(0, 2) density of s times ds / dlog s = s: Normal(0, 2) on log s
    log_prior_s = -0.5 * (log_s / 2.0) ** 2
    resid = ((y[None, :, :] - a[:, :, None] * t) ** 2).sum((1, 2))[:, None]
    log_lik = -0.5 * resid / s**2 - y.size * np.log(s)
    log_post = log_prior_a + log_prior_s + log_lik
    w = np.exp(log_post - log_post.max())
    return float((w * a).sum() / w.sum())


def test_lognormal_prior_custom_expert_nuts_and_svi_match_quadrature():
    data = line_data([1.5], [3], points=4, seed=2)  # little data: the prior matters
    expert = Custom(power_law, {"a": (1,)}, priors={"a": LOGNORMAL})
    model = built(data, 1, expert)
    result = nuts_with_known_noise(model, data, num_samples=500)
    draws = result.samples["theta_y"][..., 0, 0]
    assert np.isfinite(draws).all() and (draws > 0).all()
    mean, sd = quadrature_posterior(
        data.values["y"].double().numpy(), data.grids["y"].double().numpy()
    )
    assert abs(draws.mean() - mean) < 3 * mc_se(draws)
    assert draws.std() == pytest.approx(sd, rel=0.15)
    # SVI with Bayesian globals: the guide lives on the support and stays finite
    svi = PIMA(
        {"y": PhysicsModality(expert=expert, hidden=(8,))},
        n_clusters=1,
        latent_dim=1,
        bayesian_globals=True,
    )
    svi.fit(data, epochs=300, batch_size=3, seed=0, progress=False, lr=1e-2)
    assert np.isfinite(svi.history.loss).all()
    theta = svi.to_datatree(data, num_samples=400, posterior_predictive=False)
    a = theta["posterior"]["y_theta"].values[..., 0, 0]
    assert (a > 0).all()
    y = data.values["y"].double().numpy()
    assert a.mean() == pytest.approx(
        quadrature_posterior_unknown_noise(y, data.grids["y"].double().numpy()), rel=0.1
    )


def test_relabel_sorts_every_draw_and_permutes_all_sites_together():
    data = line_data([1.0, 2.0, 3.0], [4, 4, 4])
    net = built(data, 3, LinearThroughOrigin()).module
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(2, 5, 3, 1, generator=gen)
    pi = torch.rand(2, 5, 3, generator=gen)
    noise = torch.rand(2, 5, 3, generator=gen)
    out = relabel(net, {"pi": pi, "theta_y": theta, "noise_y": noise}, ("y", 0))
    for chain in range(2):
        for draw in range(5):
            order = sorted(range(3), key=lambda c: float(theta[chain, draw, c, 0]))
            for j, c in enumerate(order):  # brute force: cluster j of the output is c
                assert out["theta_y"][chain, draw, j, 0] == theta[chain, draw, c, 0]
                assert out["pi"][chain, draw, j] == pi[chain, draw, c]
                assert out["noise_y"][chain, draw, j] == noise[chain, draw, c]


def test_condition_on_an_unknown_site_is_refused():
    data = line_data([2.0], [10])
    model = built(data, 1, LinearThroughOrigin())
    with pytest.raises(ValueError, match="condition names"):
        physics_nuts(model.module, {"y": data.values["y"]}, condition={"pi": torch.ones(1)})
