"""Data sets with known ground truth, generated or bundled: nothing is downloaded."""

from pima_pyro.datasets.affine import affine_modalities, digits_affine, mnist_affine

__all__ = ["affine_modalities", "digits_affine", "mnist_affine"]
