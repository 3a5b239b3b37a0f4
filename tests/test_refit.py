"""A refit of a trained model keeps its cluster numbering: EM's fresh numbering is matched to
the previous clusters and the latent mixture's components follow (training.start_from_physics)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.inference.training import matching_permutation


def test_matching_permutation_recovers_a_relabelling():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    previous = torch.nn.functional.one_hot(torch.as_tensor(labels), 5).double()
    relabel = np.array([3, 0, 4, 1, 2])  # current cluster c = previous cluster perm[c]
    current = previous[:, relabel]
    noisy = 0.9 * current + 0.1 * torch.rand(200, 5, dtype=torch.float64)
    np.testing.assert_array_equal(matching_permutation(previous, noisy), relabel)


def _relabel(model: PIMA, perm: list[int]) -> None:
    """Renumber a fitted model's clusters (the same model, numbered unlike EM's)."""
    net = model.module
    with torch.no_grad():
        for tensor in (net.mixture.loc, net.mixture.unconstrained_scale, net.mixture.logits):
            tensor.copy_(tensor[perm])
        expert = net.modalities["curve"].expert
        theta, noise = expert.theta.detach()[perm], expert.noise_scale.detach()[perm]
        expert.set_theta(theta)
        expert.set_noise_scale(noise)


def test_a_refit_keeps_the_latent_clusters_on_the_physics_clusters():
    """A model numbered unlike EM (as after earlier refits on other data) is refitted: the
    refit's EM numbers the physics clusters afresh, and the latent mixture must follow, or the
    image encoder's clusters point at the wrong physics."""
    from pima_pyro.datasets import affine_modalities, digits_affine

    torch.set_num_threads(1)
    data = digits_affine(seed=0).subset(np.arange(400))
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, epochs=40, seed=0, progress=False, logger=False)
        before = np.mean(
            model.predict_clusters(data, ["image"]) == model.predict_clusters(data, ["curve"])
        )
        assert before >= 0.75
        _relabel(model, [3, 7, 0, 9, 1, 5, 8, 2, 6, 4])
        model.fit(data, epochs=1, anchor_epochs=1, seed=0, progress=False, logger=False)
    from_image = model.predict_clusters(data, given=["image"])
    from_curve = model.predict_clusters(data, given=["curve"])
    assert np.mean(from_image == from_curve) >= before - 0.05  # same numbers, no matching
