"""Physics experts: closed-form WLS against numpy, and EM recovery of known parameters."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pima_pyro.inference.initialization import physics_mixture_em
from pima_pyro.models.experts import (
    Affine,
    BilinearStressStrain,
    Custom,
    ExponentialDecay,
    LinearThroughOrigin,
    Polynomial,
    cluster_log_likelihood,
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


def test_cluster_log_likelihood_matches_torch():
    y = torch.randn(5, 7, dtype=torch.float64)
    means = torch.randn(3, 7, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64) + 0.1
    ref = torch.distributions.Normal(means, scale[:, None]).log_prob(y[:, None]).sum(-1)
    torch.testing.assert_close(cluster_log_likelihood(y, means, scale), ref)


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


def _simulate(expert, theta, noise, t, n_per_cluster, seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    labels = torch.arange(theta.shape[0]).repeat_interleave(n_per_cluster)
    means = expert.expected_curve(theta, t)
    noise = torch.as_tensor(noise, dtype=torch.float64)
    y = means[labels] + noise[labels, None] * torch.randn(
        len(labels), len(t), generator=g, dtype=torch.float64
    )
    return y, labels


def _em(expert, y, t, k):
    mask = torch.ones(y.shape[0], dtype=torch.bool)
    return physics_mixture_em({"y": y}, {"y": mask}, {"y": expert}, {"y": t}, n_clusters=k)


def _sorted_by(theta, column):
    return theta[np.argsort(theta[:, column])]


def test_exponential_decay_recovered_by_em():
    expert = ExponentialDecay()
    t = torch.linspace(0, 5, 40, dtype=torch.float64)
    rate_param = lambda k: float(np.log(np.expm1(k)))  # noqa: E731 (inverse softplus)
    truth = np.array([[3.0, rate_param(0.5), 0.2], [1.0, rate_param(2.0), -0.5]])
    y, _ = _simulate(expert, truth, [0.05, 0.05], t, 150, seed=0)
    res = _em(expert, y, t, 2)
    got = _sorted_by(res.theta["y"].numpy(), 0)
    want = _sorted_by(truth, 0)
    np.testing.assert_allclose(got[:, 0], want[:, 0], atol=0.05)  # amplitude
    np.testing.assert_allclose(
        ExponentialDecay.rate(torch.tensor(got)).numpy(), [2.0, 0.5], rtol=0.05
    )
    np.testing.assert_allclose(got[:, 2], want[:, 2], atol=0.03)  # offset
    np.testing.assert_allclose(np.sort(res.noise_scale["y"].numpy()), [0.05, 0.05], rtol=0.1)


def test_bilinear_stress_strain_recovered_by_em():
    expert = BilinearStressStrain()
    t = torch.linspace(0, 0.1, 40, dtype=torch.float64)
    truth = np.array([[200.0, 0.02, 20.0], [120.0, 0.05, 5.0]])
    y, _ = _simulate(expert, truth, [0.1, 0.1], t, 100, seed=1)
    res = _em(expert, y, t, 2)
    got = _sorted_by(res.theta["y"].numpy(), 1)
    want = _sorted_by(truth, 1)
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=0.02)  # elastic modulus
    np.testing.assert_allclose(got[:, 1], want[:, 1], atol=0.001)  # yield strain
    np.testing.assert_allclose(got[:, 2], want[:, 2], atol=1.0)  # hardening modulus


def test_bilinear_is_continuous_and_has_finite_gradient_at_the_kink():
    expert = BilinearStressStrain()
    t = torch.linspace(0, 0.1, 101, dtype=torch.float64)
    theta = torch.tensor(
        [100.0, 0.05, 10.0], dtype=torch.float64, requires_grad=True
    )  # kink on t[50]
    y = expert.expected_curve(theta, t)
    # continuity: the jump between neighbours never exceeds the elastic slope times the spacing
    assert torch.all(torch.diff(y).abs() <= 100.0 * 0.001 + 1e-9)
    # far from the kink it is the bilinear curve
    bilinear = torch.where(t < 0.05, 100 * t, 100 * 0.05 + 10 * (t - 0.05))
    far = (t - 0.05).abs() > 0.01
    torch.testing.assert_close(y[far], bilinear[far], atol=1e-6, rtol=0)
    y[50].backward()
    assert torch.isfinite(theta.grad).all()
    # d f / d eps_y at the kink is -(H - E) * sigmoid(0) = 45
    assert theta.grad[1].item() == pytest.approx(45.0, rel=1e-6)
    # finite differences agree with autograd around the kink
    for eps_y in (0.0499, 0.05, 0.0501):
        th = torch.tensor([100.0, eps_y, 10.0], dtype=torch.float64, requires_grad=True)
        expert.expected_curve(th, t).sum().backward()
        h = 1e-7
        plus = expert.expected_curve(
            torch.tensor([100.0, eps_y + h, 10.0], dtype=torch.float64), t
        ).sum()
        minus = expert.expected_curve(
            torch.tensor([100.0, eps_y - h, 10.0], dtype=torch.float64), t
        ).sum()
        assert th.grad[1].item() == pytest.approx(((plus - minus) / (2 * h)).item(), rel=1e-4)


def test_custom_expert_recovered_by_em_and_prior_is_named():
    def power_law(t, amplitude, exponent):
        return amplitude * t**exponent

    expert = Custom(
        power_law,
        {"amplitude": (1,), "exponent": (1,)},
        priors={"exponent": dist.LogNormal(torch.zeros(1), torch.ones(1)).to_event(1)},
        init={"amplitude": [1.0], "exponent": [1.0]},
    )
    assert expert.param_names == ("amplitude", "exponent")
    t = torch.linspace(0.01, 3, 50, dtype=torch.float64)
    truth = np.array([[2.0, 1.5], [0.5, 0.7]])
    y, _ = _simulate(expert, truth, [0.05, 0.05], t, 100, seed=2)
    res = _em(expert, y, t, 2)
    got = _sorted_by(res.theta["y"].numpy(), 1)
    np.testing.assert_allclose(got, _sorted_by(truth, 1), atol=0.03)
    prior = expert.prior()
    value = torch.tensor([0.3, 1.2])
    expected = dist.Normal(0.0, 10.0).log_prob(torch.tensor(0.3)) + dist.LogNormal(
        0.0, 1.0
    ).log_prob(torch.tensor(1.2))
    assert prior.log_prob(value).item() == pytest.approx(expected.item(), rel=1e-6)
    assert prior.sample((4,)).shape == (4, 2)


def test_default_priors_have_one_entry_per_parameter():
    for expert in (
        LinearThroughOrigin(),
        Affine(),
        Polynomial(2),
        ExponentialDecay(),
        BilinearStressStrain(),
    ):
        prior = expert.prior()
        assert prior.event_shape == (expert.num_params,)
        assert torch.isfinite(prior.log_prob(torch.zeros(expert.num_params)))


def test_custom_rejects_bad_arguments():
    with pytest.raises(TypeError, match="fn must be callable"):
        Custom(3, {"a": (1,)})
    with pytest.raises(ValueError, match="priors name unknown parameters"):
        Custom(lambda t, a: a * t, {"a": (1,)}, priors={"b": dist.Normal(0.0, 1.0)})


def test_polynomial_mixture_recovered_by_em():
    expert = Polynomial(2)
    t = torch.linspace(-1, 1, 30, dtype=torch.float64)
    truth = np.array([[0.5, -1.0, 2.0], [-0.5, 1.0, 0.0], [1.0, 0.0, -2.0]])
    y, _ = _simulate(expert, truth, [0.1, 0.2, 0.1], t, 120, seed=5)
    res = _em(expert, y, t, 3)
    got = _sorted_by(res.theta["y"].numpy(), 2)
    np.testing.assert_allclose(got, _sorted_by(truth, 2), atol=0.05)
    np.testing.assert_allclose(
        res.noise_scale["y"].numpy()[np.argsort(res.theta["y"].numpy()[:, 2])],
        [0.1, 0.2, 0.1],  # ordered by the t^2 coefficient: -2, 0, 2
        rtol=0.1,
    )
