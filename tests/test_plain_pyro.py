"""``model`` and ``guide`` stay usable below the class: Predictive and infer_discrete."""

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive, TraceEnum_ELBO

from pima_pyro.models.generative import MAX_PLATE_NESTING, model
from pima_pyro.models.guide import guide

from .helpers import tiny_batch, tiny_module


def test_predictive_samples_every_site_with_named_shapes():
    net = tiny_module()
    batch = tiny_batch(net)
    pred = Predictive(model, guide=guide, num_samples=7, return_sites=["c", "z", "x_x", "y_y"])
    out = pred(net, batch)
    assert out["z"].shape == (7, 6, 2)
    assert out["c"].shape == (7, 6)
    assert out["x_x"].shape == (7, 6, 3) and out["y_y"].shape == (7, 6, 5)


def test_enumeration_marginal_of_c_is_the_exact_posterior_given_z_and_y():
    """``compute_marginals`` gives p(c | z, y) = softmax(log pi + log N(z) + log p(y | c))."""
    net = tiny_module()
    batch = tiny_batch(net)
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(guide).get_trace(net, batch)
    z = guide_trace.nodes["z"]["value"]
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    marginals = elbo.compute_marginals(model, poutine.replay(guide, trace=guide_trace), net, batch)
    with torch.no_grad():
        ll_y = net.modalities["y"].likelihood().log_prob(batch.values["y"][:, None])
        logits = net.mixture.component_log_prob(z) + ll_y * batch.observed["y"][:, None]
        expected = torch.softmax(logits, -1)
    torch.testing.assert_close(marginals["c"].probs.detach(), expected, rtol=1e-9, atol=1e-12)
