"""Bundled and file-based data sets: shapes, ranges and the known slope relation."""

from pathlib import Path

import numpy as np
import pytest

from pima_pyro.datasets import digits_affine, mnist_affine

MNIST_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def test_digits_affine_has_the_seed_construction():
    data = digits_affine(noise_std=0.0, seed=0)
    assert data.n_samples == 1797
    assert data.feature_shape("image") == (8, 8) and data.feature_shape("curve") == (20,)
    images = data.values["image"].numpy()
    assert images.min() >= 0.0 and images.max() <= 1.0
    t = data.grids["curve"].numpy()
    np.testing.assert_allclose(t, np.linspace(0, 1, 20), rtol=1e-6)
    labels = data.labels.numpy()
    np.testing.assert_allclose(data.values["curve"].numpy(), labels[:, None] * t[None], atol=1e-5)


def test_digits_affine_noise_is_a_standard_deviation():
    clean = digits_affine(noise_std=0.0, seed=0).values["curve"].numpy()
    noisy = digits_affine(noise_std=0.5, seed=0).values["curve"].numpy()
    assert (noisy - clean).std() == pytest.approx(0.5, rel=0.02)


@pytest.mark.skipif(not MNIST_ROOT.exists(), reason="../shared/data/mnist is absent")
def test_mnist_affine_reads_idx_files():
    data = mnist_affine(MNIST_ROOT, split="test", limit=500, noise_std=0.0)
    assert data.n_samples == 500 and data.feature_shape("image") == (28, 28)
    assert data.labels.numpy()[:10].tolist() == [
        7,
        2,
        1,
        0,
        4,
        1,
        4,
        9,
        5,
        9,
    ]  # the known t10k head
    t = data.grids["curve"].numpy()
    np.testing.assert_allclose(
        data.values["curve"].numpy(), data.labels.numpy()[:, None] * t, atol=1e-5
    )
    assert 0.0 <= data.values["image"].min() and data.values["image"].max() <= 1.0


def test_mnist_affine_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        mnist_affine(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        mnist_affine(tmp_path, split="validation")
