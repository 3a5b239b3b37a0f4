"""The enumerated ELBO of ``model``/``guide`` against hand computations and exact evidence."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch import nn

from pima_pyro.data import Batch
from pima_pyro.models.generative import MAX_PLATE_NESTING, model
from pima_pyro.models.guide import guide
from pima_pyro.models.modalities import GaussianModality
from pima_pyro.models.module import PIMAModule

from .helpers import tiny_batch, tiny_module


def _elbo_at_guide_trace(net, batch, guide_fn=guide):
    trace = poutine.trace(guide_fn).get_trace(net, batch)
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    loss = elbo.differentiable_loss(model, poutine.replay(guide_fn, trace=trace), net, batch)
    return -loss.item(), trace.nodes["z"]["value"], trace.nodes["z"]["fn"]


def test_enumerated_elbo_equals_explicit_logsumexp_over_clusters():
    net = tiny_module()
    batch = tiny_batch(net)
    elbo, z, q = _elbo_at_guide_trace(net, batch)
    mix = net.mixture
    with torch.no_grad():
        log_pi = torch.log_softmax(mix.logits, -1)
        comp = torch.distributions.Normal(mix.loc, mix.scale).log_prob(z[:, None]).sum(-1)  # (N, K)
        phys = net.modalities["y"]
        means = phys.expert.expected_curve(phys.expert.theta, phys.grid)
        ll_y = (
            torch.distributions.Normal(means, phys.expert.noise_scale[:, None])
            .log_prob(batch.values["y"][:, None])
            .sum(-1)
        )
        joint_c = log_pi + comp + ll_y * batch.observed["y"][:, None]
        per_sample = torch.logsumexp(joint_c, dim=1)
        x_hat = net.modalities["x"].decoder(z)
        ll_x = torch.distributions.Normal(x_hat, 0.7).log_prob(batch.values["x"]).sum(-1)
        per_sample = per_sample + ll_x * batch.observed["x"] - q.log_prob(z)
        expected = (batch.n_total / batch.size) * per_sample.sum().item()
    assert elbo == pytest.approx(expected, rel=1e-10)


def test_masked_modality_contributes_nothing():
    net = tiny_module()
    batch = tiny_batch(net)
    pyro.set_rng_seed(0)
    base, _, _ = _elbo_at_guide_trace(net, batch)
    corrupted = Batch(
        values={k: v.clone() for k, v in batch.values.items()},
        observed=batch.observed,
        indices=batch.indices,
        n_total=batch.n_total,
        encode=batch.observed,
    )
    corrupted.values["x"][~batch.observed["x"]] = 123.0  # masked entries: any value
    corrupted.values["y"][~batch.observed["y"]] = -55.0
    pyro.set_rng_seed(0)
    other, _, _ = _elbo_at_guide_trace(net, corrupted)
    assert other == pytest.approx(base, rel=1e-12)


class _ExactEncoder(nn.Module):
    """Returns the exact Gaussian posterior of a linear-Gaussian model with diagonal W^T W."""

    def __init__(self, W, b, s, mu, sigma):
        super().__init__()
        prec = 1 / sigma**2 + (W**2).sum(0) / s**2  # diagonal posterior precision
        self.post_var = 1 / prec
        self.W, self.b, self.s, self.mu, self.sigma = W, b, s, mu, sigma

    def forward(self, x):
        loc = self.post_var * ((x - self.b) @ self.W / self.s**2 + self.mu / self.sigma**2)
        return loc, torch.log(self.post_var).expand_as(loc)


def _linear_gaussian(n_clusters, seed=0):
    torch.manual_seed(seed)
    D, P, s = 2, 4, 0.5
    net = PIMAModule(
        {"x": GaussianModality(shape=(P,), scale=s, hidden=(4,))}, n_clusters, D, prior_expert=False
    ).double()
    q, _ = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64))
    W = q[:, :D] * torch.tensor([1.5, 0.7], dtype=torch.float64)  # W^T W diagonal
    b = torch.randn(P, dtype=torch.float64)
    decoder = nn.Linear(D, P).double()
    with torch.no_grad():
        decoder.weight.copy_(W)
        decoder.bias.copy_(b)
        net.mixture.loc.copy_(torch.randn(n_clusters, D) * 1.5)
        net.mixture.unconstrained_scale.copy_(torch.randn(n_clusters, D) * 0.2)
        net.mixture.logits.copy_(torch.randn(n_clusters))
    net.modalities["x"].decoder = decoder
    return net, W, b, s


def test_elbo_at_exact_posterior_equals_log_evidence_for_one_cluster():
    net, W, b, s = _linear_gaussian(1)
    mu, sigma = net.mixture.loc[0].detach(), net.mixture.scale[0].detach()
    net.modalities["x"].encoder = _ExactEncoder(W, b, s, mu, sigma)
    x = torch.randn(7, 4, dtype=torch.float64) * 2
    batch = Batch({"x": x}, {"x": torch.ones(7, dtype=torch.bool)}, torch.arange(7), 7)
    cov = W @ torch.diag(sigma**2) @ W.T + s**2 * torch.eye(4, dtype=torch.float64)
    evidence = torch.distributions.MultivariateNormal(W @ mu + b, cov).log_prob(x).sum().item()
    for seed in range(3):  # exact for every draw of z, not only on average
        pyro.set_rng_seed(seed)
        elbo, _, _ = _elbo_at_guide_trace(net, batch)
        assert elbo == pytest.approx(evidence, rel=1e-10)


def test_elbo_stays_below_exact_mixture_evidence():
    net, W, b, s = _linear_gaussian(3, seed=1)
    mix = net.mixture
    mu, sigma = mix.loc.detach(), mix.scale.detach()
    # a valid but non-optimal guide: the posterior under component 0 only
    net.modalities["x"].encoder = _ExactEncoder(W, b, s, mu[0], sigma[0])
    x = torch.randn(5, 4, dtype=torch.float64) * 2
    batch = Batch({"x": x}, {"x": torch.ones(5, dtype=torch.bool)}, torch.arange(5), 5)
    eye = torch.eye(4, dtype=torch.float64)
    log_comp = torch.stack(
        [
            torch.distributions.MultivariateNormal(
                W @ mu[c] + b, W @ torch.diag(sigma[c] ** 2) @ W.T + s**2 * eye
            ).log_prob(x)
            for c in range(3)
        ],
        dim=-1,
    ) + torch.log_softmax(mix.logits.detach(), -1)
    evidence = torch.logsumexp(log_comp, -1).sum().item()
    draws = []
    for seed in range(400):
        pyro.set_rng_seed(seed)
        draws.append(_elbo_at_guide_trace(net, batch)[0])
    mean, se = float(np.mean(draws)), float(np.std(draws) / math.sqrt(len(draws)))
    assert mean < evidence + 3 * se
    gap = evidence - mean
    assert gap > 3 * se  # this guide is far from the mixture posterior: a strict bound
