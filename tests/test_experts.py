"""Physics experts: closed-form WLS against numpy, and EM recovery of known parameters."""

import numpy as np
import pytest
import torch

from pima_pyro.inference.initialization import physics_mixture_em
from pima_pyro.models.experts import (
    Affine,
    LinearThroughOrigin,
    Polynomial,
    gaussian_curve_log_likelihood,
    weighted_least_squares,
)


@pytest.mark.parametrize("expert", [LinearThroughOrigin(), Affine(), Polynomial(3)])
def test_weighted_least_squares_matches_numpy_lstsq(expert):
    rng = np.random.default_rng(0)
    t = torch.linspace(0, 1, 15, dtype=torch.float64)
    design = expert.design_matrix(t)
    curves = torch.tensor(rng.normal(size=(40, 15)))
    weights = torch.tensor(rng.uniform(size=(40, 3)))
    theta, s2 = weighted_least_squares(design, curves, weights, ridge=0.0)
    phi = design.numpy()
    for c in range(3):
        w = np.sqrt(weights[:, c].numpy())
        a = np.concatenate([w[n] * phi for n in range(40)])
        b = np.concatenate([w[n] * curves[n].numpy() for n in range(40)])
        ref, *_ = np.linalg.lstsq(a, b, rcond=None)
        np.testing.assert_allclose(theta[c].numpy(), ref, rtol=1e-8, atol=1e-10)
        resid = ((curves.numpy() - phi @ ref) ** 2).sum(1)
        expected_s2 = (weights[:, c].numpy() * resid).sum() / (15 * weights[:, c].sum().item())
        assert s2[c].item() == pytest.approx(expected_s2, rel=1e-8)


def test_expected_curve_equals_design_times_theta():
    t = torch.linspace(-1, 2, 9, dtype=torch.float64)
    for expert in (LinearThroughOrigin(), Affine(), Polynomial(2)):
        theta = torch.randn(4, expert.num_params, dtype=torch.float64)
        torch.testing.assert_close(
            expert.expected_curve(theta, t), theta @ expert.design_matrix(t).T
        )


def test_gaussian_curve_log_likelihood_matches_torch():
    y = torch.randn(5, 7, dtype=torch.float64)
    means = torch.randn(3, 7, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64) + 0.1
    ref = torch.distributions.Normal(means, scale[:, None]).log_prob(y[:, None]).sum(-1)
    torch.testing.assert_close(gaussian_curve_log_likelihood(y, means, scale), ref)


def test_em_recovers_affine_mixture_parameters():
    rng = np.random.default_rng(3)
    true_theta = np.array([[2.0, -1.0], [-3.0, 0.5], [0.5, 3.0]])
    true_noise = np.array([0.2, 0.4, 0.3])
    labels = rng.integers(0, 3, size=600)
    t = np.linspace(0, 1, 25)
    y = (
        true_theta[labels, :1] * t
        + true_theta[labels, 1:]
        + rng.normal(size=(600, 25)) * true_noise[labels, None]
    )
    expert = Affine()
    res = physics_mixture_em(
        {"y": torch.tensor(y)},
        {"y": torch.ones(600, dtype=torch.bool)},
        {"y": expert},
        {"y": torch.tensor(t)},
        n_clusters=3,
        seed=0,
    )
    order = np.argsort(res.theta["y"][:, 0].numpy())
    truth_order = np.argsort(true_theta[:, 0])
    np.testing.assert_allclose(res.theta["y"].numpy()[order], true_theta[truth_order], atol=0.1)
    np.testing.assert_allclose(
        res.noise_scale["y"].numpy()[order], true_noise[truth_order], atol=0.03
    )
    np.testing.assert_allclose(
        res.weights.numpy()[order], np.bincount(labels)[truth_order] / 600, atol=0.01
    )
    em_cluster_of_label = order[np.argsort(truth_order)]
    assert (res.responsibilities.argmax(1).numpy() == em_cluster_of_label[labels]).mean() > 0.99


def test_em_ignores_masked_samples():
    rng = np.random.default_rng(4)
    t = np.linspace(0, 1, 10)
    labels = rng.integers(0, 2, 200)
    y = np.where(labels[:, None] == 0, 1.0, 4.0) * t + 0.1 * rng.normal(size=(200, 10))
    mask = np.ones(200, dtype=bool)
    mask[:50] = False
    y_corrupt = y.copy()
    y_corrupt[:50] = 1e3  # garbage in unobserved rows must not matter
    res = physics_mixture_em(
        {"y": torch.tensor(y_corrupt)},
        {"y": torch.tensor(mask)},
        {"y": LinearThroughOrigin()},
        {"y": torch.tensor(t)},
        n_clusters=2,
    )
    np.testing.assert_allclose(np.sort(res.theta["y"][:, 0].numpy()), [1.0, 4.0], atol=0.05)


def test_polynomial_rejects_bad_degree():
    with pytest.raises(ValueError, match="degree"):
        Polynomial(-1)
