"""The closed-form objective against Pyro's enumeration and against the plain ELBO."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.closed_form import closed_form_bound, mixture_terms
from pima_pyro.metrics import matched_accuracy
from pima_pyro.models.generative import MAX_PLATE_NESTING, model
from pima_pyro.models.guide import encode

from .helpers import tiny_batch, tiny_module


def _gamma_guide(gamma):
    """PoE guide for z plus c ~ Categorical(gamma), enumerated by TraceEnum_ELBO."""

    def guide(net, batch):
        pyro.module("pima", net)
        loc, log_var = encode(net, batch.values, batch.observed)
        with pyro.plate("data", size=batch.n_total, subsample=batch.indices):
            pyro.sample("c", dist.Categorical(probs=gamma), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(1))

    return guide


def test_closed_form_equals_expectation_of_enumerated_monte_carlo_elbo():
    net = tiny_module()
    batch = tiny_batch(net, n_total=6)  # no subsampling: compare per-batch sums
    with torch.no_grad():
        loc, log_var = encode(net, batch.values, batch.observed)
        gamma = torch.softmax(mixture_terms(net, batch, loc, torch.exp(log_var)), -1)
        # the decoder term is the only Monte-Carlo part of the closed form: average it too
        pyro.set_rng_seed(0)
        closed = torch.stack([closed_form_bound(net, batch).sum() for _ in range(1000)])
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    guide = _gamma_guide(gamma)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        draws = np.array([-elbo.loss(model, guide, net, batch) for _ in range(1000)])
    mean, se = draws.mean(), draws.std() / math.sqrt(len(draws))
    closed_mean, closed_se = closed.mean().item(), closed.std().item() / math.sqrt(len(closed))
    assert abs(mean - closed_mean) < 3 * math.hypot(se, closed_se)


def test_closed_form_is_below_the_enumerated_elbo_in_expectation():
    net = tiny_module()
    batch = tiny_batch(net, n_total=6)
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    from pima_pyro.models.guide import guide

    pyro.set_rng_seed(2)
    with torch.no_grad():
        mc = np.array([-elbo.loss(model, guide, net, batch) for _ in range(1000)])
        closed = np.array([closed_form_bound(net, batch).sum().item() for _ in range(1000)])
    se = math.hypot(mc.std(), closed.std()) / math.sqrt(2000)
    assert closed.mean() <= mc.mean() + 3 * se  # Jensen: logsumexp of E <= E of logsumexp


@pytest.mark.parametrize("objective", ["elbo", "closed_form"])
def test_fit_with_either_objective_trains_the_image_encoder(objective):
    # Joint accuracy is no test of the objective: the physics EM start alone gives 0.99 (lr
    # 1e-12 measured: joint 0.992, image-only 0.148). Held-out image-only accuracy needs a
    # working objective: measured 0.695 (elbo) and 0.776 (closed form) at these settings.
    data = digits_affine(seed=0).subset(np.arange(700))
    train, test = data.train_test_split(0.3, seed=0)
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    model.fit(train, epochs=60, seed=0, progress=False, objective=objective)
    image_only, _ = matched_accuracy(
        test.labels.numpy(), model.predict_clusters(test, given=["image"])
    )
    assert image_only >= 0.6
