"""The censored normal against its definition: atoms Phi(a) and 1 - Phi(b), the normal density
inside, total mass 1, the closed-form mean, and draws that reproduce the atoms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pima_pyro import PIMA, GaussianModality
from pima_pyro.models.censored import CensoredNormal

CASES = [(0.2, 0.5), (-0.4, 0.3), (1.3, 1.0), (0.5, 0.05)]


@pytest.mark.parametrize(("loc", "scale"), CASES)
def test_atoms_density_and_total_mass(loc, scale):
    d = CensoredNormal(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), 0, 1
    )
    at_low = math.exp(d.log_prob(torch.tensor(0.0, dtype=torch.float64)))
    at_high = math.exp(d.log_prob(torch.tensor(1.0, dtype=torch.float64)))
    assert at_low == pytest.approx(stats.norm.cdf(0, loc, scale), rel=1e-9)
    assert at_high == pytest.approx(stats.norm.sf(1, loc, scale), rel=1e-9)
    inside, _ = integrate.quad(
        lambda x: math.exp(d.log_prob(torch.tensor(x, dtype=torch.float64))), 0, 1, points=[loc]
    )
    assert at_low + at_high + inside == pytest.approx(1.0, abs=1e-8)
    below = d.log_prob(torch.tensor(-3.0, dtype=torch.float64))  # clipped values are the atom
    assert float(below) == pytest.approx(math.log(at_low), rel=1e-12)


@pytest.mark.parametrize(("loc", "scale"), CASES)
def test_mean_is_the_mean_of_the_clipped_normal(loc, scale):
    d = CensoredNormal(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), 0, 1
    )
    expected, _ = integrate.quad(
        lambda x: min(max(x, 0.0), 1.0) * stats.norm.pdf(x, loc, scale),
        loc - 12 * scale,
        loc + 12 * scale,
        points=[0.0, 1.0],
    )
    assert float(d.mean) == pytest.approx(expected, abs=1e-9)


def test_draws_reproduce_the_atoms():
    torch.manual_seed(0)
    d = CensoredNormal(torch.tensor(0.2), torch.tensor(0.5), 0.0, 1.0)
    x = d.sample((200_000,))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert float((x == 0).float().mean()) == pytest.approx(stats.norm.cdf(0, 0.2, 0.5), abs=4e-3)
    assert float((x == 1).float().mean()) == pytest.approx(stats.norm.sf(1, 0.2, 0.5), abs=4e-3)


def test_bounds_are_validated_and_data_outside_them_refused():
    with pytest.raises(ValueError, match="bounds"):
        PIMA({"x": GaussianModality(bounds=(1.0, 0.0))})
    from pima_pyro import MultimodalData

    data = MultimodalData({"x": np.array([[0.0, 1.5], [0.2, 0.3]])})
    model = PIMA({"x": GaussianModality(bounds=(0.0, 1.0), hidden=(4,))}, n_clusters=1)
    with pytest.raises(ValueError, match="modality 'x'.*bounds"):
        model.fit(data, epochs=1, progress=False)


def _tree(observed: np.ndarray, replicated: np.ndarray, mask: np.ndarray):
    import xarray as xr

    n, f = observed.shape
    return xr.DataTree.from_dict(
        {
            "observed_data": xr.Dataset({"x": (("obs", "f"), observed)}),
            "posterior_predictive": xr.Dataset(
                {"x": (("chain", "draw", "obs", "f"), replicated.reshape(1, -1, n, f))}
            ),
            "constant_data": xr.Dataset({"x_observed": (("obs",), mask)}),
        }
    )


def test_value_ppc_against_hand_computed_figures():
    from pima_pyro.criticism import value_ppc

    rng = np.random.default_rng(0)
    observed = rng.random((50, 4))
    mask = np.ones(50, dtype=bool)
    mask[:10] = False  # unobserved rows take no part
    observed[:10] = 100.0
    # replicates that copy the data: every value inside its own (degenerate) interval
    same = value_ppc(_tree(observed, np.repeat(observed[None], 20, 0), mask), "x")
    assert same["per_value_coverage"] == 1.0
    assert same["replicated_outside_observed_range"] == 0.0
    # wide Gaussian replicates: the share outside [min, max] matches the normal cdf
    wide = rng.normal(0.5, 2.0, (400, 50, 4))
    figures = value_ppc(_tree(observed, wide, mask), "x")
    kept = observed[mask]
    expected = stats.norm.cdf(kept.min(), 0.5, 2.0) + stats.norm.sf(kept.max(), 0.5, 2.0)
    assert figures["replicated_outside_observed_range"] == pytest.approx(expected, abs=0.01)
    assert figures["pooled_coverage"] == 1.0
