"""Split-and-merge moves judged by the joint ELBO undo a planted wrong partition."""

import copy
import warnings

import numpy as np
import pytest
import torch

from pima_pyro import PIMA, GaussianModality, LinearThroughOrigin, MultimodalData, PhysicsModality
from pima_pyro.inference.initialization import em_from_responsibilities, em_problem
from pima_pyro.inference.joint_moves import (
    elbo_of,
    joint_split_and_merge,
    move_sample,
    place_mixture_on_embeddings,
    refit_from_responsibilities,
)
from pima_pyro.inference.posterior import latent_posterior
from pima_pyro.inference.svi import set_physics_from_em
from pima_pyro.metrics import matched_accuracy


def _toy(n_per: int = 80, seed: int = 0):
    """Four clusters that x (8 features) and the curves (slopes 1, 3, 5, 7) both tell apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per)
    codes = 3.0 * np.random.default_rng(99).normal(size=(4, 8))
    x = codes[labels] + 0.5 * rng.normal(size=(labels.size, 8))
    t = np.linspace(0, 1, 10)
    slopes = np.array([1.0, 3.0, 5.0, 7.0])
    y = slopes[labels][:, None] * t + 0.3 * rng.normal(size=(labels.size, 10))
    values = {"x": x.astype("float32"), "y": y.astype("float32")}
    return MultimodalData(values, grids={"y": t}, labels=labels)


def _toy_specs() -> dict:
    return {
        "x": GaussianModality(shape=(8,), scale=0.5),
        "y": PhysicsModality(expert=LinearThroughOrigin()),
    }


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    data = _toy()
    model = PIMA(_toy_specs(), n_clusters=4, latent_dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, epochs=60, seed=0, progress=False, logger=False, num_threads=1)
    assert bool(model.module.mixture.active.all())  # four true clusters: pruning keeps them
    return model, data


def _accuracy(model, data) -> float:
    return matched_accuracy(data.labels.numpy(), model.cluster_posterior(data).argmax(1))[0]


def test_moves_undo_a_planted_merge_and_split_that_em_alone_cannot_leave(fitted):
    model, data = fitted
    assert _accuracy(model, data) >= 0.95
    net = copy.deepcopy(model.module)
    full = data.to_batch()
    sample = move_sample(full, net.latent_dim, seed=0)
    wrong = torch.zeros(sample.size, 4)  # 0 and 1 merged, 3 split in halves by row order
    labels = data.labels[sample.indices]
    wrong[:, 0] = (labels <= 1).float()
    wrong[:, 2] = (labels == 2).float()
    threes = torch.nonzero(labels == 3).flatten()
    wrong[threes[::2], 3] = 1.0
    wrong[threes[1::2], 1] = 1.0
    refit_from_responsibilities(net, sample, wrong)
    physics = em_problem(
        {"y": sample.values["y"]},
        {"y": sample.observed["y"]},
        {"y": net.modalities["y"].expert},
        {"y": net.modalities["y"].grid},
    )
    set_physics_from_em(net, em_from_responsibilities(wrong.double(), physics, net.mixture.active))
    planted = copy.deepcopy(model)
    planted.module = net
    assert _accuracy(planted, data) <= 0.8
    before = elbo_of(net, sample)
    kept = joint_split_and_merge(net, full, seed=0)
    assert kept and elbo_of(net, sample) > before
    assert _accuracy(planted, data) >= 0.95
    slopes = np.sort(planted.physics_parameters()["y"]["theta"].ravel())
    np.testing.assert_allclose(slopes, [1.0, 3.0, 5.0, 7.0], atol=0.1)


def test_without_a_better_move_the_state_is_left_exactly_as_it_was(fitted):
    model, data = fitted
    net = copy.deepcopy(model.module)
    state = copy.deepcopy(net.state_dict())
    kept = joint_split_and_merge(net, data.to_batch(), seed=0, rounds=0)
    assert kept == []
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_the_latent_mixture_is_placed_on_samples_with_a_curve_only(fitted):
    """Physics EM gives a sample without a curve r = pi; counted, it would pull every
    component towards the centre of all embeddings. mu_c must be the mean embedding of the
    samples with a curve in cluster c, exactly."""
    model, data = fitted
    net = model.module
    hidden = copy.deepcopy(data)
    hidden.masks["y"] = torch.as_tensor(np.arange(data.n_samples) % 2 == 0)
    batch = hidden.to_batch(dtype=net.mixture.loc.dtype)
    labels = torch.as_tensor(data.labels)
    resp = torch.nn.functional.one_hot(labels, 4).double()
    resp[~hidden.masks["y"]] = 0.25
    state = copy.deepcopy(net.state_dict())
    try:
        place_mixture_on_embeddings(net, batch, resp)
        loc, _ = latent_posterior(net, batch, net.modality_names)
        with_curve = hidden.masks["y"]
        for c in range(4):
            expected = loc[with_curve & (labels == c)].mean(0)
            torch.testing.assert_close(net.mixture.loc[c], expected.to(net.mixture.loc))
    finally:
        net.load_state_dict(state)


def test_clusters_without_samples_are_parked_on_the_heaviest_and_leave_the_scale_alone():
    """An inactive cluster left where EM dropped it (t0 = 34 for a law over [0, 1]) and an
    empty active one with a non-finite estimate take the heaviest usable cluster's theta and
    noise; the experts' optimisation scale is then the active clusters' own (before: 34 for
    every cluster, which made the first full-phase steps collapse a K = 6 logistic fit)."""
    net = PIMA(_toy_specs(), n_clusters=4).build(_toy())
    theta = torch.tensor([[1.0], [3.0], [34.0], [float("inf")]], dtype=torch.float64)
    noise = torch.tensor([0.3, 0.2, 1e-3, 0.5], dtype=torch.float64)
    active = torch.tensor([True, True, False, True])
    weights = torch.tensor([0.3, 0.7, 0.0, 0.0], dtype=torch.float64)
    em = em_from_responsibilities(
        torch.eye(4)[torch.arange(40) % 2].double(),
        em_problem(
            {"y": torch.zeros(40, 10)},
            {"y": torch.ones(40, dtype=torch.bool)},
            {"y": net.modalities["y"].expert},
            {"y": net.modalities["y"].grid},
        ),
        active,
    )
    em.theta["y"], em.noise_scale["y"], em.weights, em.active = theta, noise, weights, active
    set_physics_from_em(net, em)
    expert = net.modalities["y"].expert
    torch.testing.assert_close(expert.theta.detach().ravel(), torch.tensor([1.0, 3.0, 3.0, 3.0]))
    torch.testing.assert_close(expert.noise_scale.detach(), torch.tensor([0.3, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(expert.theta_scale, torch.tensor([3.0]))
