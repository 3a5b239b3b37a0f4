"""Data sets with known ground truth, generated or bundled: nothing is downloaded."""

from pima_pyro.datasets.affine import affine_modalities, digits_affine, mnist_affine
from pima_pyro.datasets.digits_physics import digits_physics
from pima_pyro.datasets.lattice import lattice, lattice_modalities, lattice_truth
from pima_pyro.datasets.pvd import pvd, pvd_modalities
from pima_pyro.datasets.tribology import tribology, tribology_modalities

__all__ = [
    "affine_modalities",
    "digits_affine",
    "digits_physics",
    "lattice",
    "lattice_modalities",
    "lattice_truth",
    "mnist_affine",
    "pvd",
    "pvd_modalities",
    "tribology",
    "tribology_modalities",
]
