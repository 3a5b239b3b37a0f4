"""pima-pyro: Physics-Informed Multimodal Autoencoders as Pyro models."""

__version__ = "0.2.0"

from pima_pyro import datasets  # noqa: E402
from pima_pyro.data import Batch, MultimodalData  # noqa: E402
from pima_pyro.files import PIMAFileError  # noqa: E402
from pima_pyro.models import (  # noqa: E402
    Affine,
    BernoulliModality,
    BilinearStressStrain,
    Custom,
    ExponentialDecay,
    GaussianModality,
    LinearThroughOrigin,
    PhysicsExpert,
    PhysicsModality,
    Polynomial,
)
from pima_pyro.pima import PIMA  # noqa: E402

__all__ = [
    "PIMA",
    "Affine",
    "Batch",
    "BernoulliModality",
    "BilinearStressStrain",
    "Custom",
    "ExponentialDecay",
    "GaussianModality",
    "LinearThroughOrigin",
    "MultimodalData",
    "PIMAFileError",
    "PhysicsExpert",
    "PhysicsModality",
    "Polynomial",
    "__version__",
    "datasets",
]
