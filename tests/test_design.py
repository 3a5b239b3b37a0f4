"""Expected information gain: zero where nothing can be learned, the mutual information of a
tiny case computed by quadrature, a Monte-Carlo error that shrinks as 1/sqrt(draws), and a
batch rule that does not pick duplicates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pima_pyro import PIMA, GaussianModality, LinearThroughOrigin, MultimodalData, PhysicsModality
from pima_pyro.inference.design import physics_information_gain, select_batch

SLOPES = torch.tensor([[0.0], [1.0], [2.5]])
NOISE = torch.tensor([0.5, 0.5, 0.8])


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(0)
    data = MultimodalData(
        {"image": rng.random((30, 2, 2)), "curve": rng.normal(size=(30, 1))},
        grids={"curve": np.array([1.0])},
    )
    specs = {
        "image": GaussianModality(hidden=(4,)),
        "curve": PhysicsModality(expert=LinearThroughOrigin(), hidden=(4,)),
    }
    model = PIMA(specs, n_clusters=3, latent_dim=2)
    model.fit(data, epochs=1, progress=False, logger=False, num_threads=1, prune_clusters=False)
    expert = model.module.modalities["curve"].expert
    expert.set_theta(SLOPES)
    expert.set_noise_scale(NOISE)
    return model.module


def _eig(net, prior, draws, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return physics_information_gain(net, torch.log(prior), "curve", draws, gen)


def test_zero_for_a_certain_cluster_and_for_a_measurement_independent_of_c(net):
    certain = torch.tensor([[0.0, 1.0, 0.0]])
    eig, se = _eig(net, certain, 500)
    assert float(eig[0]) == pytest.approx(0.0, abs=1e-6) and float(se[0]) < 1e-6
    expert = net.modalities["curve"].expert
    expert.set_theta(torch.ones(3, 1))
    expert.set_noise_scale(torch.full((3,), 0.5))
    try:
        eig, _ = _eig(net, torch.tensor([[0.2, 0.3, 0.5]]), 500)
        assert float(eig[0]) == pytest.approx(0.0, abs=1e-6)
    finally:
        expert.set_theta(SLOPES)
        expert.set_noise_scale(NOISE)


def _mutual_information_by_quadrature(prior: np.ndarray) -> float:
    """I(c; y) for y | c ~ N(slope_c * 1, noise_c^2) on a fine grid (brute force)."""
    y = np.linspace(-6.0, 8.0, 200_001)
    slopes, noise = SLOPES[:, 0].numpy().astype(float), NOISE.numpy().astype(float)
    dens = np.exp(-0.5 * ((y[None] - slopes[:, None]) / noise[:, None]) ** 2) / (
        noise[:, None] * math.sqrt(2 * math.pi)
    )
    marginal = prior @ dens
    integrand = (prior[:, None] * dens * np.log(dens / marginal)).sum(0)
    return float(np.trapezoid(integrand, y))


def test_equals_the_mutual_information_of_a_tiny_case(net):
    prior = np.array([0.5, 0.3, 0.2])
    truth = _mutual_information_by_quadrature(prior)
    eig, se = _eig(net, torch.tensor(prior[None], dtype=torch.float32), 40_000)
    print(f"EIG {float(eig[0]):.4f} +- {float(se[0]):.4f}; quadrature {truth:.4f}")
    assert abs(float(eig[0]) - truth) < 4 * float(se[0]) + 1e-3
    assert 0.0 < truth < float(-(prior * np.log(prior)).sum())  # below the entropy


def test_monte_carlo_error_shrinks_as_one_over_root_draws(net):
    prior = torch.tensor([[0.4, 0.4, 0.2]])
    spread = {}
    for draws in (100, 1600):
        estimates = [float(_eig(net, prior, draws, seed)[0][0]) for seed in range(40)]
        spread[draws] = float(np.std(estimates))
        reported = float(_eig(net, prior, draws, 0)[1][0])
        assert 0.6 < reported / spread[draws] < 1.6  # the reported error is the real one
    assert 2.8 < spread[100] / spread[1600] < 5.7  # sqrt(1600 / 100) = 4


def test_batch_selection_discounts_duplicates():
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores = np.array([1.0, 0.99, 0.5])
    assert select_batch(scores, probs, 2).tolist() == [0, 2]  # not the duplicate of 0
    assert select_batch(scores, probs, 3).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="size"):
        select_batch(scores, probs, 4)


def test_the_model_method_refuses_what_it_cannot_do_and_zeroes_measured_rows(net):
    rng = np.random.default_rng(1)
    mask = np.arange(30) % 2 == 0
    data = MultimodalData(
        {"image": rng.random((30, 2, 2)), "curve": rng.normal(size=(30, 1))},
        grids={"curve": np.array([1.0])},
        masks={"curve": mask},
    )
    model = PIMA(
        {"image": GaussianModality(hidden=(4,)),
         "curve": PhysicsModality(expert=LinearThroughOrigin(), hidden=(4,))},
        n_clusters=3, latent_dim=2,
    )  # fmt: skip
    model.module = net
    eig, se = model.expected_information_gain(data, measure="curve", num_samples=64, return_se=True)
    assert eig.shape == (30,) and np.all(eig[mask] == 0) and np.all(eig[~mask] >= -1e-6)
    entropy = model.cluster_entropy(data, given=["image"])
    assert np.all(eig[~mask] <= entropy[~mask] + 4 * se[~mask] + 1e-6)  # I(c; y) <= H(c)
    with pytest.raises(ValueError, match="measure: 'image' is not a physics modality"):
        model.expected_information_gain(data, measure="image")
    with pytest.raises(ValueError, match="about='physics' needs bayesian_globals=True"):
        model.expected_information_gain(data, about="physics")
    with pytest.raises(ValueError, match="about"):
        model.expected_information_gain(data, about="theta")


def test_the_measurement_loop_measures_a_batch_per_round_by_each_strategy():
    from pima_pyro.datasets import affine_modalities, digits_affine
    from pima_pyro.design import measurement_loop

    data = digits_affine(seed=0).subset(np.arange(120))
    known = np.zeros(120, dtype=bool)
    known[:12] = True
    for strategy in ("eig", "entropy", "random"):
        model = PIMA(affine_modalities(hidden=(16,)), n_clusters=10, latent_dim=2)
        history = measurement_loop(
            model, data, "curve", known, strategy, batch=12, rounds=2,
            evaluate=lambda m: {"weights": m.mixture_parameters()["weights"].sum()},
            fit_options={"epochs": 2, "batch_size": 32, "em_starts": 1}, seed=0,
        )  # fmt: skip
        assert [r["fraction"] for r in history] == [0.1, 0.2, 0.3]
        assert all(abs(r["weights"] - 1.0) < 1e-4 for r in history)
    with pytest.raises(ValueError, match="strategy"):
        measurement_loop(model, data, "curve", known, "greedy", 12, 1, evaluate=dict)


def test_a_lab_instrument_callback_gives_what_unmasking_the_held_values_gives():
    from pima_pyro.datasets import affine_modalities, digits_affine
    from pima_pyro.design import measurement_loop

    data = digits_affine(seed=0).subset(np.arange(120))
    held = data.values["curve"].numpy()
    lab = MultimodalData(  # what a lab holds: no curve where none was measured
        {
            "image": data.values["image"].numpy(),
            "curve": np.where(np.arange(120)[:, None] < 12, held, 0.0),
        },
        masks={"curve": np.arange(120) < 12},
        grids={"curve": data.grids["curve"].numpy()},
        labels=data.labels.numpy(),
    )
    asked: list[np.ndarray] = []

    def instrument(indices: np.ndarray) -> np.ndarray:
        asked.append(np.sort(indices))
        return held[indices]

    options = {"epochs": 2, "batch_size": 32, "em_starts": 1}
    histories = []
    for source, callback in ((data, None), (lab, instrument)):
        model = PIMA(affine_modalities(hidden=(16,)), n_clusters=10, latent_dim=2)
        histories.append(measurement_loop(
            model, source, "curve", np.arange(120) < 12, "eig", batch=12, rounds=2,
            evaluate=lambda m: {"slopes": m.physics_parameters()["curve"]["theta"][:, 0]},
            fit_options=options, seed=0, measure_fn=callback,
        ))  # fmt: skip
    assert len(asked) == 2 and all(a.size == 12 and a.min() >= 12 for a in asked)
    for simulated, measured in zip(*histories, strict=True):
        np.testing.assert_allclose(measured["slopes"], simulated["slopes"], rtol=1e-5, atol=1e-6)
    model = PIMA(affine_modalities(hidden=(16,)), n_clusters=10, latent_dim=2)
    with pytest.raises(ValueError, match="measure_fn must return finite values of shape"):
        measurement_loop(
            model, lab, "curve", np.arange(120) < 12, "random", 12, 1,
            evaluate=lambda m: {}, fit_options=options, measure_fn=lambda i: held[i, :5],
        )  # fmt: skip


GRID = np.array([0.5, 1.0, 2.0])


@pytest.fixture(scope="module")
def bayesian():
    """Three clusters y = theta_c t under Bayesian globals, with the guide set by hand."""
    rng = np.random.default_rng(0)
    data = MultimodalData(
        {"image": rng.random((30, 2, 2)), "curve": rng.normal(size=(30, GRID.size))},
        grids={"curve": GRID},
    )
    specs = {
        "image": GaussianModality(hidden=(4,)),
        "curve": PhysicsModality(expert=LinearThroughOrigin(), hidden=(4,)),
    }
    model = PIMA(specs, n_clusters=3, latent_dim=2, bayesian_globals=True)
    # the curves are noise, which pruning would reduce to one cluster; the test sets all three
    model.fit(data, epochs=1, progress=False, logger=False, num_threads=1, prune_clusters=False)
    expert = model.module.modalities["curve"].expert
    expert.set_theta(SLOPES)
    expert.set_noise_scale(NOISE)
    with torch.no_grad():  # guide sd of theta: 0.3, 1.0, 1e-4 (the last cluster already known)
        expert.q_theta_log_sd.copy_(torch.log(torch.tensor([[0.3], [1.0], [1e-4]])))
        expert.q_theta_log_sd -= torch.log(expert.theta_scale)
    return model, data


def _mutual_information_linear_gaussian(sd: float, noise: float, t: np.ndarray) -> float:
    """I(theta; y) for theta ~ N(m, sd^2), y = theta t + N(0, noise^2 I), from the (T, T)
    marginal covariance (no P-space algebra), and by Monte Carlo as a check of that."""
    cov = noise**2 * np.eye(t.size) + sd**2 * np.outer(t, t)
    exact = 0.5 * (np.linalg.slogdet(cov)[1] - t.size * np.log(noise**2))
    rng = np.random.default_rng(0)
    theta = rng.normal(0.0, sd, 200_000)
    y = theta[:, None] * t + noise * rng.normal(size=(theta.size, t.size))
    log_lik = -0.5 * ((y - theta[:, None] * t) ** 2).sum(1) / noise**2 - t.size * np.log(noise)
    inv = np.linalg.inv(cov)
    log_marginal = -0.5 * np.einsum("ni,ij,nj->n", y, inv, y) - 0.5 * np.linalg.slogdet(cov)[1]
    draws = log_lik - log_marginal  # the 2 pi terms cancel
    assert abs(draws.mean() - exact) < 4 * draws.std() / np.sqrt(draws.size)
    return exact


def test_physics_gain_is_the_mutual_information_of_the_linear_gaussian_update(bayesian):
    from pima_pyro.inference.design import physics_parameter_gain

    model, _ = bayesian
    gains = physics_parameter_gain(model.module, "curve").double().numpy()
    for c, sd in enumerate([0.3, 1.0]):
        truth = _mutual_information_linear_gaussian(sd, float(NOISE[c]), GRID)
        assert gains[c] == pytest.approx(truth, rel=1e-4)
    assert gains[2] == pytest.approx(0.0, abs=1e-6)  # nothing left to learn about cluster 2


def test_physics_gain_of_a_sample_is_its_cluster_posterior_times_the_cluster_gains(bayesian):
    from pima_pyro.inference.design import physics_parameter_gain

    model, data = bayesian
    measured = np.arange(data.n_samples) % 3 == 0
    data = MultimodalData(
        {n: v.numpy() for n, v in data.values.items()},
        grids={"curve": GRID},
        masks={"curve": measured},
    )
    eig = model.expected_information_gain(data, about="physics")
    probs = model.cluster_posterior(data, given=["image"])
    gains = physics_parameter_gain(model.module, "curve").double().numpy()
    assert np.all(eig[measured] == 0)
    np.testing.assert_allclose(eig[~measured], (probs @ gains)[~measured], rtol=1e-5)
    assert eig[~measured].min() > 0.1


def _decay(t, a, k):
    return a * torch.exp(-k * t)


def test_physics_gain_with_two_parameters_one_constrained_and_cluster_noises():
    """f = a exp(-k t), k > 0 (LogNormal prior: the guide is Gaussian in u = log k). The gain
    against the T-space determinant with the Jacobian written by hand."""
    import pyro.distributions as dist

    from pima_pyro import Custom
    from pima_pyro.inference.design import physics_parameter_gain

    rng = np.random.default_rng(0)
    data = MultimodalData(
        {"image": rng.random((30, 2, 2)), "curve": rng.random((30, GRID.size))},
        grids={"curve": GRID},
    )
    prior_k = dist.LogNormal(torch.zeros(1), torch.ones(1)).to_event(1)
    expert = Custom(_decay, {"a": (1,), "k": (1,)}, priors={"k": prior_k})
    specs = {"image": GaussianModality(hidden=(4,)), "curve": PhysicsModality(expert=expert)}
    model = PIMA(specs, n_clusters=2, latent_dim=2, bayesian_globals=True)
    model.fit(data, epochs=1, progress=False, logger=False, num_threads=1, prune_clusters=False)
    fitted = model.module.modalities["curve"].expert
    theta = np.array([[1.0, 0.5], [2.0, 1.5]])
    noise = np.array([0.3, 0.6])
    sd = np.array([[0.2, 0.4], [0.5, 0.1]])  # guide sd of (a, log k)
    fitted.set_theta(torch.tensor(theta, dtype=torch.float32))
    fitted.set_noise_scale(torch.tensor(noise, dtype=torch.float32))
    with torch.no_grad():
        fitted.q_theta_log_sd.copy_(torch.log(torch.tensor(sd) / fitted.theta_scale.double()))
    gains = physics_parameter_gain(model.module, "curve").double().numpy()
    for c in range(2):
        a, k = theta[c]
        jac = np.stack([np.exp(-k * GRID), -a * GRID * k * np.exp(-k * GRID)], axis=1)
        cov = np.eye(GRID.size) + jac @ np.diag(sd[c] ** 2) @ jac.T / noise[c] ** 2
        assert gains[c] == pytest.approx(0.5 * np.linalg.slogdet(cov)[1], rel=1e-4)


def test_the_measurement_loop_refuses_about_physics_it_cannot_honour_before_fitting():
    from pima_pyro.design import measurement_loop

    rng = np.random.default_rng(0)
    data = MultimodalData(
        {"image": rng.random((12, 2, 2)), "curve": rng.random((12, 1))},
        grids={"curve": np.array([1.0])},
    )
    specs = {
        "image": GaussianModality(hidden=(4,)),
        "curve": PhysicsModality(expert=LinearThroughOrigin()),
    }
    point = PIMA(specs, n_clusters=2, latent_dim=2)
    known = np.arange(12) < 4
    for model, strategy, match in (
        (point, "eig", "bayesian_globals"),
        (PIMA(specs, n_clusters=2, latent_dim=2, bayesian_globals=True), "random", "strategy"),
    ):
        with pytest.raises(ValueError, match=match):
            measurement_loop(model, data, "curve", known, strategy, 2, 1, dict, about="physics")
        assert model.module is None  # refused before any fit
    with pytest.raises(ValueError, match="about"):
        measurement_loop(point, data, "curve", known, "eig", 2, 1, dict, about="theta")
