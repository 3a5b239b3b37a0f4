"""How a PIMA model is FIT and QUERIED (imports :mod:`pima_pyro.models`, never the reverse)."""

from pima_pyro.inference.initialization import mixture_from_embeddings, physics_mixture_em
from pima_pyro.inference.posterior import (
    Prediction,
    cluster_log_posterior,
    latent_posterior,
    predict_modality,
)
from pima_pyro.inference.svi import History

__all__ = [
    "History",
    "Prediction",
    "cluster_log_posterior",
    "fit",
    "latent_posterior",
    "mixture_from_embeddings",
    "physics_mixture_em",
    "predict_modality",
]


def __getattr__(name: str) -> object:
    # Lightning takes seconds to import: only a fit needs it
    if name == "fit":
        from pima_pyro.inference.training import fit

        return fit
    raise AttributeError(f"module 'pima_pyro.inference' has no attribute {name!r}")
