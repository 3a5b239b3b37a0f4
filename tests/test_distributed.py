"""Two gloo processes give the same parameters as one process on the same global batches."""

import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine


def _fit(devices, batch_size):
    data = digits_affine(seed=0).subset(np.arange(256))
    model = PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)
    history = model.fit(
        data, epochs=2, batch_size=batch_size, seed=1, strategy="ddp", devices=devices
    )
    return model, history


def test_two_processes_equal_one_process_on_the_same_batches():
    single, h1 = _fit(devices=1, batch_size=64)
    double, h2 = _fit(devices=2, batch_size=32)  # 2 x 32 = the same global batch of 64
    a, b = single.module.state_dict(), double.module.state_dict()
    max_diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"ddp max abs diff: {max_diff:.3g}")
    assert max_diff <= 1e-5
    np.testing.assert_allclose(h1.loss, h2.loss, rtol=1e-5)
    # and training moved the parameters (the comparison is not between two untouched copies)
    fresh = PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)
    torch.manual_seed(1)
    fresh.module = fresh._build(digits_affine(seed=0).subset(np.arange(256)))
    moved = max(
        (a[k] - v).abs().max().item()
        for k, v in fresh.module.state_dict().items()
        if "encoder" in k
    )
    assert moved > 1e-3
