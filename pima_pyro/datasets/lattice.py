r"""Two (or more) lattice populations: an image of the lattice and a stress-strain curve.

The seed's first claim: once image and curve share a latent, images alone identify the
population and predict the curve, so "low-throughput uniaxial testing [is] replaced with
high-throughput imaging". Ground truth per population p:

* image (``image_size`` squared): struts of a square (even p) or diagonal (odd p) lattice with
  population-specific period and strut width, a random phase per sample, pixel noise;
* curve: :class:`~pima_pyro.models.experts.BilinearStressStrain` with parameters
  :func:`lattice_truth` (elastic modulus, yield strain, hardening modulus), a 3% per-sample
  spread of the moduli and Gaussian noise ``noise_std`` on a strain grid in [0, 0.1].
"""

from __future__ import annotations

import numpy as np
import torch

from pima_pyro.data import MultimodalData
from pima_pyro.models.experts import BilinearStressStrain
from pima_pyro.models.modalities import GaussianModality, Modality, PhysicsModality

#: Strain grid: 30 points in [0, 0.1].
STRAIN_POINTS = 30
STRAIN_MAX = 0.1


def lattice_truth(n_populations: int = 2) -> np.ndarray:
    """True ``(E, eps_y, H)`` per population, (P, 3): stiff/early-yield to soft/late-yield."""
    if n_populations < 2:
        raise ValueError(f"lattice: n_populations must be >= 2, got {n_populations}")
    frac = np.linspace(0.0, 1.0, n_populations)
    elastic = 200.0 - 80.0 * frac
    yield_strain = 0.02 + 0.03 * frac
    hardening = 20.0 - 15.0 * frac
    return np.stack([elastic, yield_strain, hardening], axis=1)


def _lattice_image(population: int, size: int, rng: np.random.Generator) -> np.ndarray:
    period = 4 + population // 2 * 2  # 4, 4, 6, 6, ...
    width = 1 + population % 2  # thin / thick struts
    dx, dy = rng.integers(0, period, size=2)
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    if population % 2 == 0:
        struts = ((i + dx) % period < width) | ((j + dy) % period < width)
    else:
        struts = ((i + j + dx) % period < width) | ((i - j + dy) % period < width)
    return struts.astype(np.float32)


def lattice(
    n_per_population: int = 150,
    n_populations: int = 2,
    image_size: int = 16,
    noise_std: float = 0.3,
    pixel_noise_std: float = 0.2,
    seed: int = 0,
) -> MultimodalData:
    """Modalities ``image`` (image_size, image_size) and ``curve`` (30,); labels = population."""
    if n_per_population < 1:
        raise ValueError(f"lattice: n_per_population must be >= 1, got {n_per_population}")
    rng = np.random.default_rng(seed)
    truth = lattice_truth(n_populations)
    labels = np.repeat(np.arange(n_populations), n_per_population)
    rng.shuffle(labels)
    images = np.stack([_lattice_image(int(p), image_size, rng) for p in labels])
    images = images + rng.normal(0.0, pixel_noise_std, images.shape).astype(np.float32)
    grid = np.linspace(0.0, STRAIN_MAX, STRAIN_POINTS)
    theta = truth[labels].copy()
    theta[:, [0, 2]] *= 1.0 + 0.03 * rng.standard_normal((labels.size, 2))
    expert = BilinearStressStrain()
    curves = expert.expected_curve(torch.tensor(theta), torch.tensor(grid)).numpy()
    curves = curves + rng.normal(0.0, noise_std, curves.shape)
    return MultimodalData({"image": images, "curve": curves}, grids={"curve": grid}, labels=labels)


def lattice_modalities(pixel_scale: float = 1.0) -> dict[str, Modality]:
    """Specs: a Gaussian ``image`` (fixed scale) and a bilinear physics ``curve``.

    The pixel scale is 1.0, not the true pixel noise 0.2: at 0.5 the 256 pixels make the latent
    encode the lattice phase first and image-only population accuracy varied from 0.79 to 0.99
    over seeds 0-2 (100 epochs, batch 32); at 1.0 it was 0.97-1.00 (DESIGN section 8 on
    likelihood balance).
    """
    return {
        "image": GaussianModality(scale=pixel_scale, hidden=(128, 64)),
        "curve": PhysicsModality(expert=BilinearStressStrain()),
    }
