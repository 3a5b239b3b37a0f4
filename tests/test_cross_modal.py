"""The cross-modal cluster term against a hand computation, and what its gradient reaches."""

import math

import numpy as np
import pytest
import torch

from pima_pyro.data import Batch
from pima_pyro.inference.cross_modal import (
    cross_modal_loss,
    encoder_cluster_log_posterior,
    physics_targets,
)

from .helpers import tiny_batch, tiny_module


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(-1, keepdims=True)
    return np.exp(a) / np.exp(a).sum(-1, keepdims=True)


def _by_hand(net, batch) -> float:
    """Bayes' rule on the physics likelihood, the PoE with the N(0, I) expert, the expected
    component log-density and the cross-entropy, all in numpy."""
    with torch.no_grad():
        log_pi = net.mixture.log_weights.numpy()
        expert = net.modalities["y"].expert
        means = expert.expected_curve(expert.theta, net.modalities["y"].grid).numpy()  # (K, T)
        noise = expert.noise_scale.numpy()  # (K,)
        m_x, log_v_x = (t.numpy() for t in net.modalities["x"].encoder(batch.values["x"]))
        mu, sigma = net.mixture.loc.numpy(), net.mixture.scale.numpy()
    y = batch.values["y"].numpy()
    resid = y[:, None, :] - means[None]  # (N, K, T)
    ll = (-0.5 * (resid / noise[None, :, None]) ** 2 - np.log(noise)[None, :, None]).sum(-1)
    ll = ll - 0.5 * y.shape[1] * math.log(2 * math.pi)
    r = _softmax(log_pi + ll)
    precision = 1.0 + np.exp(-log_v_x)
    var = 1.0 / precision
    loc = m_x * np.exp(-log_v_x) * var
    expected = -0.5 * (
        np.log(2 * math.pi * sigma**2)[None]
        + (var[:, None] + (loc[:, None] - mu[None]) ** 2) / sigma[None] ** 2
    ).sum(-1)
    log_q = np.log(_softmax(log_pi + expected))
    paired = batch.observed["x"].numpy() & batch.observed["y"].numpy()
    return float(-((r * log_q).sum(-1) * paired).sum() / batch.observed["y"].numpy().sum())


def test_cross_modal_loss_equals_the_hand_computed_cross_entropy():
    net = tiny_module()
    batch = tiny_batch(net)
    assert float(cross_modal_loss(net, batch).detach()) == pytest.approx(
        _by_hand(net, batch), rel=1e-10
    )


def test_rows_without_a_pair_contribute_nothing():
    net = tiny_module()
    batch = tiny_batch(net)
    batch.observed["y"] = torch.zeros_like(batch.observed["y"])
    assert float(cross_modal_loss(net, batch)) == 0.0


def test_its_gradient_reaches_the_data_encoders_only():
    net = tiny_module()
    cross_modal_loss(net, tiny_batch(net)).backward()
    moved = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("modalities.x.encoder.") for n in moved)


def _informative_toy(n: int = 300, seed: int = 0):
    """Three clusters: x is a noisy code of the cluster, y an Affine line per cluster."""
    net = tiny_module(n_clusters=3, latent_dim=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    codes = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]], dtype=torch.float64)
    x = codes[labels] + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    expert, grid = net.modalities["y"].expert, net.modalities["y"].grid
    with torch.no_grad():
        curves = expert.expected_curve(expert.theta, grid)[labels]
    y = curves + 0.05 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.bool)
    return net, Batch({"x": x, "y": y}, {"x": ones, "y": ones}, torch.arange(n), n), labels


def test_minimising_it_teaches_the_encoder_the_physics_clusters_and_nothing_else():
    net, batch, labels = _informative_toy()
    target, _ = physics_targets(net, batch)
    assert bool((target.argmax(1) == labels).all())  # the physics alone knows the clusters
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if "encoder" not in n}
    before = encoder_cluster_log_posterior(net, "x", batch.values["x"]).argmax(1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        cross_modal_loss(net, batch).backward()
        optimizer.step()
    after = encoder_cluster_log_posterior(net, "x", batch.values["x"]).argmax(1)
    assert float((before == labels).double().mean()) < 0.7  # the start does not know them
    assert float((after == labels).double().mean()) >= 0.98
    for name, value in frozen.items():
        assert torch.equal(dict(net.named_parameters())[name].detach(), value), name


@pytest.mark.parametrize("weight", [0.0, 2.5])
def test_a_step_minimises_the_elbo_plus_the_weighted_term_and_logs_the_elbo(weight):
    from pima_pyro.data import MultimodalData
    from pima_pyro.inference.training_plan import LoopOptions, PIMATrainingPlan, Schedule

    net = tiny_module()
    batch = tiny_batch(net)
    data = MultimodalData({"x": batch.values["x"].float(), "y": batch.values["y"].float()})
    options = LoopOptions(batch_size=6, lr=1e-3, seed=0, cross_modal_weight=weight)
    plan = PIMATrainingPlan(net, data, Schedule(1, 0, 0), options)
    plan._objective = lambda b: torch.tensor(1.0, dtype=torch.float64)
    objective, logged = plan.step_objective(batch)
    expected = 1.0 + weight * float(cross_modal_loss(net, batch).detach())
    assert float(objective.detach()) == pytest.approx(expected, rel=1e-12)
    assert float(logged) == 1.0


@pytest.mark.parametrize(
    "option, error",
    [
        ({"cross_modal_weight": -0.5}, ValueError),
        ({"cross_modal_weight": float("nan")}, ValueError),
        ({"cross_modal_weight": "1"}, TypeError),
        ({"joint_moves": -1}, ValueError),
        ({"joint_moves": 1.5}, TypeError),
    ],
)
def test_bad_weights_and_move_counts_are_refused_naming_the_option(option, error):
    from pima_pyro.inference.training import FitOptions

    with pytest.raises(error, match=next(iter(option))):
        FitOptions.from_keywords(option)
