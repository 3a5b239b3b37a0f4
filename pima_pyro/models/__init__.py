"""What the model IS: the generative story, its guide and the pieces they are made of."""

from pima_pyro.models.experts import (
    Affine,
    BilinearStressStrain,
    Custom,
    ExponentialDecay,
    LinearThroughOrigin,
    PhysicsExpert,
    Polynomial,
)
from pima_pyro.models.generative import model
from pima_pyro.models.guide import guide
from pima_pyro.models.modalities import (
    BernoulliModality,
    GaussianModality,
    Modality,
    PhysicsModality,
)
from pima_pyro.models.module import PIMAModule
from pima_pyro.models.poe import poe_posterior

__all__ = [
    "Affine",
    "BernoulliModality",
    "BilinearStressStrain",
    "Custom",
    "ExponentialDecay",
    "GaussianModality",
    "LinearThroughOrigin",
    "Modality",
    "PIMAModule",
    "PhysicsExpert",
    "PhysicsModality",
    "Polynomial",
    "guide",
    "model",
    "poe_posterior",
]
