"""Cluster posterior against Bayes' rule; predictions against closed forms."""

import numpy as np
import torch

from pima_pyro.inference.posterior import cluster_log_posterior, predict_modality

from .helpers import tiny_batch, tiny_module


def _bayes_physics(net, batch):
    """Hand-written p(c | y) = pi_c N(y; f_c, s_c^2 I) / sum_c' (numpy, float64)."""
    pi = torch.softmax(net.mixture.logits, -1).detach().numpy()
    expert = net.modalities["y"].expert
    f = expert.expected_curve(expert.theta, net.modalities["y"].grid).detach().numpy()
    s = expert.noise_scale.detach().numpy()
    y = batch.values["y"].numpy()
    T = y.shape[1]
    log_lik = (
        -0.5 * ((y[:, None, :] - f[None]) ** 2).sum(-1) / s**2
        - T * np.log(s)
        - 0.5 * T * np.log(2 * np.pi)
    )
    log_lik = log_lik * batch.observed["y"].numpy()[:, None]
    log_post = np.log(pi) + log_lik
    log_post -= log_post.max(1, keepdims=True)
    post = np.exp(log_post)
    return post / post.sum(1, keepdims=True)


def test_physics_only_cluster_posterior_is_bayes_rule():
    net = tiny_module()
    batch = tiny_batch(net)
    got = cluster_log_posterior(net, batch, ["y"]).exp().numpy()
    np.testing.assert_allclose(got, _bayes_physics(net, batch), rtol=1e-9, atol=1e-12)
    # unobserved physics: the prior pi
    pi = torch.softmax(net.mixture.logits, -1).detach().numpy()
    for n in np.flatnonzero(~batch.observed["y"].numpy()):
        np.testing.assert_allclose(got[n], pi, rtol=1e-9)


def test_data_and_physics_combine_by_bayes_rule():
    net = tiny_module()
    batch = tiny_batch(net)
    with torch.no_grad():
        loc, _ = net.modalities["x"].encoder(batch.values["x"])
        # PoE of one expert with the N(0, I) prior expert
        _, log_var = net.modalities["x"].encoder(batch.values["x"])
        prec = torch.exp(-log_var) + 1
        post_loc = loc * torch.exp(-log_var) / prec
        log_pc_z = torch.log_softmax(net.mixture.component_log_prob(post_loc), -1).numpy()
    data_only = cluster_log_posterior(net, batch, ["x"], num_samples=0).exp().numpy()
    obs_x = batch.observed["x"].numpy()
    pi = torch.softmax(net.mixture.logits, -1).detach().numpy()
    expected_data = np.where(obs_x[:, None], np.exp(log_pc_z), pi)
    np.testing.assert_allclose(data_only, expected_data, rtol=1e-9)
    both = cluster_log_posterior(net, batch, ["x", "y"], num_samples=0).exp().numpy()
    phys = _bayes_physics(net, batch)
    expected = expected_data * phys / pi  # p(c|x) p(y|c) ∝ p(c|x) p(c|y) / pi_c
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(both, expected, rtol=1e-9)
    assert np.allclose(both.sum(1), 1.0)


def test_quasi_monte_carlo_cluster_posterior_matches_quadrature():
    """p(c | x) = E_q(z|x) p(c | z) against Gauss-Hermite quadrature over the 2-D latent."""
    net = tiny_module()
    batch = tiny_batch(net)
    gen = torch.Generator().manual_seed(5)
    got = cluster_log_posterior(net, batch, ["x"], num_samples=4096, generator=gen).exp().numpy()
    assert np.allclose(got.sum(1), 1.0)
    with torch.no_grad():
        from pima_pyro.models.guide import encode

        loc, log_var = encode(net, {"x": batch.values["x"]}, {"x": batch.observed["x"]})
        sd = torch.exp(0.5 * log_var)
        nodes, weights = np.polynomial.hermite.hermgauss(40)
        grid = torch.as_tensor(np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1)).reshape(
            -1, 2
        )
        w = torch.as_tensor(np.outer(weights, weights).reshape(-1) / np.pi)
        z = loc[None] + np.sqrt(2.0) * sd[None] * grid[:, None, :]  # (G, N, 2)
        mix = net.mixture
        # Bayes' rule by hand: pi_c N(z; mu_c, sigma_c^2)
        log_joint = torch.log_softmax(mix.logits, -1) + torch.distributions.Normal(
            mix.loc, mix.scale
        ).log_prob(z[..., None, :]).sum(-1)
        exact = (w[:, None, None] * torch.softmax(log_joint, -1)).sum(0).numpy()
    obs = batch.observed["x"].numpy()
    np.testing.assert_allclose(got[obs], exact[obs], atol=2e-3)
    np.testing.assert_allclose(
        got[~obs],
        np.exp(net.plug_in_logits().detach().numpy())[None].repeat((~obs).sum(), 0),
        rtol=1e-6,
    )  # nothing given: the prior


def test_physics_prediction_mean_is_posterior_weighted_expert_curve():
    net = tiny_module()
    batch = tiny_batch(net)
    gen = torch.Generator().manual_seed(0)
    pred = predict_modality(net, batch, ["y"], "y", num_samples=20000, generator=gen)
    post = _bayes_physics(net, batch)
    expert = net.modalities["y"].expert
    f = expert.expected_curve(expert.theta, net.modalities["y"].grid).detach().numpy()
    np.testing.assert_allclose(pred.mean.numpy(), post @ f, rtol=1e-9)
    # Monte Carlo draws agree with the exact mixture mean within sampling error
    spread = np.sqrt(
        (post @ (f**2 + expert.noise_scale.detach().numpy()[:, None] ** 2)) - (post @ f) ** 2
    )
    assert np.all(
        np.abs(pred.samples.mean(0).numpy() - post @ f) < 5 * spread / np.sqrt(20000) + 1e-9
    )
    assert np.all(pred.lower.numpy() <= pred.upper.numpy())


def test_data_prediction_interval_covers_observation_noise():
    net = tiny_module()
    batch = tiny_batch(net)
    gen = torch.Generator().manual_seed(0)
    pred = predict_modality(net, batch, ["y"], "x", num_samples=4000, generator=gen, interval=0.9)
    width = (pred.upper - pred.lower).numpy()
    # at least the 90% interval of N(0, 0.7^2): 2 * 1.645 * 0.7
    assert np.all(width > 2 * 1.645 * 0.7 * 0.9)
    assert pred.samples.shape == (4000, 6, 3)
