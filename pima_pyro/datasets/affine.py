r"""The seed's toy: an image of a digit :math:`Z` and a line of slope :math:`Z`.

.. math::

    x_1 = \text{image of } Z, \qquad x_2 = Z\,t + \varepsilon,\ \varepsilon \sim
    \mathcal N(0, \texttt{noise\_std}^2), \quad t = \text{20 points in } [0, 1].

Ground truth: 10 clusters (the digits), slopes 0..9 (expert :class:`LinearThroughOrigin`).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from pima_pyro.data import MultimodalData
from pima_pyro.models.experts import LinearThroughOrigin
from pima_pyro.models.modalities import GaussianModality, Modality, PhysicsModality

#: Number of points on the grid t of the curve modality.
CURVE_POINTS = 20


def _affine_curves(labels: np.ndarray, noise_std: float, rng: np.random.Generator):
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    curves = labels[:, None] * grid[None, :] + rng.normal(
        0.0, noise_std, (labels.size, CURVE_POINTS)
    )
    return grid, curves


def digits_affine(noise_std: float = 0.5, seed: int = 0) -> MultimodalData:
    """scikit-learn's bundled 8x8 digits (1,797 images, scaled to [0, 1]) with their lines.

    Modalities: ``image`` (8, 8) and ``curve`` (20,), grid ``t`` in [0, 1]; ``labels`` = digit.
    """
    if noise_std < 0:
        raise ValueError(f"digits_affine: noise_std must be >= 0, got {noise_std}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    grid, curves = _affine_curves(labels, noise_std, np.random.default_rng(seed))
    return MultimodalData({"image": images, "curve": curves}, grids={"curve": grid}, labels=labels)


def affine_modalities(
    image_scale: float = 0.5, image_network: str = "mlp", hidden: tuple[int, ...] = (256, 128)
) -> dict[str, Modality]:
    """Specs for the toy: a Gaussian ``image`` of fixed scale and a physics ``curve``.

    ``image_scale`` is the pixel noise standard deviation. Smaller values make the pixels
    dominate the ELBO and weaken the image-only cluster posterior (DESIGN section 8); 0.5 on
    pixels in [0, 1] is the default that recovers the clusters from images alone.
    """
    return {
        "image": GaussianModality(scale=image_scale, network=image_network, hidden=hidden),
        "curve": PhysicsModality(expert=LinearThroughOrigin()),
    }


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {header!r})")
        ndim = header[3]
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"mnist_affine: neither {stem} nor {stem}.gz in {root}; the package never downloads, "
        "point root at a folder with the standard MNIST IDX files"
    )


def mnist_affine(
    root: str | os.PathLike[str],
    split: str = "train",
    noise_std: float = 0.5,
    seed: int = 0,
    limit: int | None = None,
) -> MultimodalData:
    """MNIST (28x28, scaled to [0, 1]) with the same lines, from IDX files (gz or raw) in ``root``.

    ``split`` is ``"train"`` (60,000) or ``"test"`` (10,000); ``limit`` keeps the first samples.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"mnist_affine: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    rng = np.random.default_rng(seed + (0 if split == "train" else 1_000_003))
    grid, curves = _affine_curves(labels, noise_std, rng)
    return MultimodalData(
        {"image": images.astype(np.float32) / 255.0, "curve": curves},
        grids={"curve": grid},
        labels=labels,
    )
