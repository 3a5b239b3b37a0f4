"""Property-based tests (hypothesis) of the product of experts and the cluster posterior."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pima_pyro.inference.posterior import cluster_log_posterior
from pima_pyro.models.poe import LOG_VAR_MAX, poe_posterior

from .helpers import tiny_batch, tiny_module

floats = st.floats(-5, 5, allow_nan=False, width=64)
log_vars = st.floats(-4, 4, allow_nan=False, width=64)


@st.composite
def experts(draw, max_experts=4, samples=3, dim=2):
    m = draw(st.integers(1, max_experts))
    loc = draw(arrays(np.float64, (m, samples, dim), elements=floats))
    log_var = draw(arrays(np.float64, (m, samples, dim), elements=log_vars))
    mask = draw(arrays(np.bool_, (m, samples)))
    return torch.tensor(loc), torch.tensor(log_var), torch.tensor(mask)


@settings(max_examples=60, deadline=None)
@given(experts(), st.randoms(use_true_random=False), st.booleans())
def test_order_of_experts_does_not_matter(e, rnd, prior):
    loc, log_var, mask = e
    perm = list(range(loc.shape[0]))
    rnd.shuffle(perm)
    a = poe_posterior(loc, log_var, mask, prior)
    b = poe_posterior(loc[perm], log_var[perm], mask[perm], prior)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@settings(max_examples=60, deadline=None)
@given(experts(max_experts=1))
def test_one_expert_returns_itself(e):
    loc, log_var, _ = e
    out_loc, out_log_var = poe_posterior(loc, log_var, prior_expert=False)
    torch.testing.assert_close(out_loc, loc[0])
    torch.testing.assert_close(out_log_var, log_var[0])


@settings(max_examples=60, deadline=None)
@given(experts(), arrays(np.float64, (3, 2), elements=floats), st.booleans())
def test_infinitely_vague_expert_changes_nothing(e, vague_loc, prior):
    loc, log_var, mask = e
    mask = mask.clone()
    mask[0] = True  # at least one real expert
    base = poe_posterior(loc, log_var, mask, prior)
    vague = torch.full((1, 3, 2), LOG_VAR_MAX, dtype=torch.float64)
    more = poe_posterior(
        torch.cat([loc, torch.tensor(vague_loc)[None]]),
        torch.cat([log_var, vague]),
        torch.cat([mask, torch.ones(1, 3, dtype=torch.bool)]),
        prior,
    )
    # weight of the vague expert <= exp(4 - 18) ~ 8e-7; times a mean gap <= 10
    torch.testing.assert_close(more[0], base[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(more[1], base[1], atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(experts(), st.booleans())
def test_masks_equal_removal(e, prior):
    loc, log_var, mask = e
    for n in range(loc.shape[1]):
        keep = mask[:, n]
        full = poe_posterior(loc[:, n : n + 1], log_var[:, n : n + 1], mask[:, n : n + 1], prior)
        if keep.any():
            removed = poe_posterior(
                loc[keep, n : n + 1], log_var[keep, n : n + 1], prior_expert=prior
            )
            torch.testing.assert_close(full[0], removed[0])
            torch.testing.assert_close(full[1], removed[1])


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000), st.sampled_from([["x"], ["y"], ["x", "y"]]), st.permutations([0, 1, 2])
)
def test_cluster_posterior_sums_to_one_and_follows_relabelling(seed, given_names, perm):
    net = tiny_module(seed=seed)
    batch = tiny_batch(net, seed=seed + 1)
    p = cluster_log_posterior(net, batch, given_names, num_samples=0).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(6, dtype=p.dtype))
    perm = torch.tensor(perm)
    with torch.no_grad():
        for param in (
            net.mixture.logits,
            net.mixture.loc,
            net.mixture.unconstrained_scale,
            net.modalities["y"].expert.theta_unit,
            net.modalities["y"].expert.unconstrained_noise,
        ):
            param.copy_(param[perm])
    q = cluster_log_posterior(net, batch, given_names, num_samples=0).exp()
    torch.testing.assert_close(q, p[:, perm])
