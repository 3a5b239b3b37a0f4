"""The product of experts against a brute-force product of Gaussian densities."""

import math

import numpy as np
import pytest
import torch

from pima_pyro.models.poe import LOG_VAR_MAX, poe_posterior


def _log_normal(z, loc, log_var):
    return -0.5 * ((z - loc) ** 2 / np.exp(log_var) + log_var + math.log(2 * math.pi))


@pytest.mark.parametrize("prior_expert", [False, True])
def test_poe_matches_numerical_product_of_densities(prior_expert):
    rng = np.random.default_rng(0)
    num_experts, num_samples = 3, 5
    locs = rng.normal(size=(num_experts, num_samples, 1))
    log_vars = rng.normal(scale=0.7, size=(num_experts, num_samples, 1))
    masks = np.array([[1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=bool)
    loc, log_var = poe_posterior(
        torch.tensor(locs), torch.tensor(log_vars), torch.tensor(masks), prior_expert
    )
    grid = np.linspace(-12, 12, 200_001)
    for n in range(num_samples):
        log_density = np.zeros_like(grid)
        for m in range(num_experts):
            if masks[m, n]:
                log_density += _log_normal(grid, locs[m, n, 0], log_vars[m, n, 0])
        if prior_expert:
            log_density += _log_normal(grid, 0.0, 0.0)
        w = np.exp(log_density - log_density.max())
        w /= w.sum()
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        assert loc[n, 0].item() == pytest.approx(mean, abs=1e-6)
        assert math.exp(log_var[n, 0].item()) == pytest.approx(var, rel=1e-5)


def test_poe_log_density_differs_from_product_by_a_constant():
    """log prod_m N(z; mu_m, s_m) - log N(z; mu, s) is constant in z (multivariate, diagonal)."""
    torch.manual_seed(1)
    locs = torch.randn(4, 3, 2, dtype=torch.float64)
    log_vars = torch.randn(4, 3, 2, dtype=torch.float64)
    loc, log_var = poe_posterior(locs, log_vars, prior_expert=True)
    z = torch.randn(10, 3, 2, dtype=torch.float64) * 3
    prod = torch.distributions.Normal(locs, torch.exp(0.5 * log_vars)).log_prob(z[:, None]).sum(1)
    prod = prod + torch.distributions.Normal(0.0, 1.0).log_prob(z)
    post = torch.distributions.Normal(loc, torch.exp(0.5 * log_var)).log_prob(z)
    diff = (prod - post).numpy()
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:1], diff.shape), atol=1e-9)


def test_masks_equal_removal_and_order_is_irrelevant():
    torch.manual_seed(2)
    locs = torch.randn(3, 6, 4, dtype=torch.float64)
    log_vars = torch.randn(3, 6, 4, dtype=torch.float64)
    masks = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool
    )
    a = poe_posterior(locs, log_vars, masks, prior_expert=False)
    b = poe_posterior(locs[[0, 2]], log_vars[[0, 2]], prior_expert=False)
    c = poe_posterior(locs[[2, 0]], log_vars[[2, 0]], prior_expert=False)
    for x, y in ((a, b), (b, c)):
        torch.testing.assert_close(x[0], y[0])
        torch.testing.assert_close(x[1], y[1])


def test_single_expert_returns_itself_and_vague_expert_changes_nothing():
    locs = torch.tensor([[[0.3, -1.2]], [[5.0, 5.0]]], dtype=torch.float64)
    log_vars = torch.tensor([[[-0.5, 1.0]], [[LOG_VAR_MAX, LOG_VAR_MAX]]], dtype=torch.float64)
    one = poe_posterior(locs[:1], log_vars[:1], prior_expert=False)
    torch.testing.assert_close(one[0], locs[0])
    torch.testing.assert_close(one[1], log_vars[0])
    two = poe_posterior(locs, log_vars, prior_expert=False)
    torch.testing.assert_close(two[0], locs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(two[1], log_vars[0], atol=1e-6, rtol=0)


def test_no_expert_gives_standard_normal_not_nan_and_gradients_are_finite():
    locs = torch.randn(2, 3, 2, requires_grad=True)
    log_vars = torch.randn(2, 3, 2, requires_grad=True)
    masks = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    loc, log_var = poe_posterior(locs, log_vars, masks, prior_expert=False)
    assert torch.all(loc[2] == 0) and torch.all(log_var[2] == 0)
    (loc.sum() + log_var.sum()).backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(log_vars.grad).all()


def test_extreme_log_variances_stay_finite():
    locs = torch.tensor([[[1.0]], [[2.0]]])
    log_vars = torch.tensor([[[-1e4]], [[1e4]]])
    loc, log_var = poe_posterior(locs, log_vars, prior_expert=True)
    assert torch.isfinite(loc).all() and torch.isfinite(log_var).all()
    assert loc.item() == pytest.approx(1.0, abs=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="masks must be"):
        poe_posterior(
            torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.ones(3, 2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"\(M, N, D\)"):
        poe_posterior(torch.zeros(2, 3), torch.zeros(2, 3))
