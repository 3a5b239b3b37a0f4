"""Small hand-made models for the math tests."""

from __future__ import annotations

import torch

from pima_pyro.data import Batch
from pima_pyro.models.experts import Affine
from pima_pyro.models.modalities import GaussianModality, PhysicsModality
from pima_pyro.models.module import PIMAModule


def tiny_module(n_clusters: int = 3, latent_dim: int = 2, seed: int = 0) -> PIMAModule:
    """Data modality ``x`` (3 features, scale 0.7) and physics ``y`` (Affine, 5 points)."""
    torch.manual_seed(seed)
    specs = {
        "x": GaussianModality(shape=(3,), scale=0.7, hidden=(8,)),
        "y": PhysicsModality(shape=(5,), expert=Affine(), hidden=(8,)),
    }
    net = PIMAModule(specs, n_clusters, latent_dim).double()
    with torch.no_grad():
        net.mixture.logits.copy_(torch.randn(n_clusters))
        net.mixture.loc.copy_(2 * torch.randn(n_clusters, latent_dim))
        net.mixture.unconstrained_scale.copy_(torch.randn(n_clusters, latent_dim) * 0.3)
        net.modalities["y"].expert.set_theta(3 * torch.randn(n_clusters, 2))
        net.modalities["y"].expert.unconstrained_noise.copy_(torch.randn(n_clusters) * 0.3)
        net.modalities["y"].grid.copy_(torch.linspace(0, 1, 5))
    return net


def tiny_batch(net: PIMAModule, n: int = 6, n_total: int = 20, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 5, generator=g, dtype=torch.float64) * 2
    observed = {
        "x": torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool)[:n],
        "y": torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)[:n],
    }
    x = torch.where(observed["x"][:, None], x, torch.zeros_like(x))
    y = torch.where(observed["y"][:, None], y, torch.zeros_like(y))
    return Batch({"x": x, "y": y}, observed, torch.arange(n) * 3, n_total)
