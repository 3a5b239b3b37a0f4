"""A refit of a trained model keeps its cluster numbering: EM's fresh numbering is matched to
the previous clusters and the latent mixture's components follow (training.start_from_physics)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pima_pyro import PIMA, GaussianModality, LinearThroughOrigin, MultimodalData, PhysicsModality
from pima_pyro.inference.training import matching_permutation


def test_matching_permutation_recovers_a_relabelling():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    previous = torch.nn.functional.one_hot(torch.as_tensor(labels), 5).double()
    relabel = np.array([3, 0, 4, 1, 2])  # current cluster c = previous cluster perm[c]
    current = previous[:, relabel]
    noisy = 0.9 * current + 0.1 * torch.rand(200, 5, dtype=torch.float64)
    np.testing.assert_array_equal(matching_permutation(previous, noisy), relabel)


def _data(seed: int = 0) -> MultimodalData:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 60)
    codes = 3.0 * np.random.default_rng(99).normal(size=(4, 8))
    x = codes[labels] + 0.5 * rng.normal(size=(labels.size, 8))
    t = np.linspace(0, 1, 10)
    y = np.array([1.0, 3.0, 5.0, 7.0])[labels][:, None] * t + 0.3 * rng.normal(size=(240, 10))
    return MultimodalData({"x": x, "y": y}, grids={"y": t}, labels=labels)


def test_a_refit_on_more_curves_keeps_the_cluster_numbering():
    torch.set_num_threads(1)
    data = _data()
    half = MultimodalData(
        {n: v.numpy() for n, v in data.values.items()},
        grids={"y": data.grids["y"].numpy()},
        masks={"y": np.arange(240) % 2 == 0},
    )
    specs = {
        "x": GaussianModality(shape=(8,), scale=0.5),
        "y": PhysicsModality(expert=LinearThroughOrigin()),
    }
    model = PIMA(specs, n_clusters=4, latent_dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(half, epochs=40, seed=0, progress=False, logger=False)
        before = model.predict_clusters(data, given=["x"])
        slopes_before = model.physics_parameters()["y"]["theta"][:, 0].copy()
        # another seed: EM's starts, and so its numbering, differ from the first fit's
        model.fit(data, epochs=4, seed=3, progress=False, logger=False)
    after = model.predict_clusters(data, given=["x"])
    assert np.mean(before == after) >= 0.95  # the same numbers, without any matching
    np.testing.assert_allclose(
        model.physics_parameters()["y"]["theta"][:, 0], slopes_before, atol=0.2
    )
