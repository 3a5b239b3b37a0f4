"""``PIMAModule``: every learnable piece of one PIMA model in one ``nn.Module``.

It holds the per-modality modules (encoders, decoders, likelihood scales, physics experts with
their grids) and the Gaussian-mixture prior. The Pyro ``model`` and ``guide`` functions take it as
their first argument, so that the same object works with ``pyro.module``, plain torch
optimisers, ``state_dict`` checkpoints and ``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from pima_pyro.models.mixture import GaussianMixturePrior
from pima_pyro.models.modalities import (
    DataModalityModule,
    Modality,
    PhysicsModality,
    PhysicsModalityModule,
)


class PIMAModule(nn.Module):
    """Networks and global parameters of a PIMA model with ``n_clusters`` clusters."""

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        n_clusters: int,
        latent_dim: int,
        prior_expert: bool = True,
    ) -> None:
        super().__init__()
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.prior_expert = prior_expert
        self.modality_names: tuple[str, ...] = tuple(modalities)
        self.modalities = nn.ModuleDict(
            {name: spec.build(name, latent_dim, n_clusters) for name, spec in modalities.items()}
        )
        self.mixture = GaussianMixturePrior(n_clusters, latent_dim)

    @property
    def physics_names(self) -> tuple[str, ...]:
        return tuple(
            n for n in self.modality_names if isinstance(self.modalities[n], PhysicsModalityModule)
        )

    @property
    def data_names(self) -> tuple[str, ...]:
        return tuple(
            n for n in self.modality_names if isinstance(self.modalities[n], DataModalityModule)
        )

    def is_physics(self, name: str) -> bool:
        return isinstance(self.modalities[name].spec, PhysicsModality)
