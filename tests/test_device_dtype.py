"""Every tensor created inside model, guide, a training step and the queries follows the data's
device and dtype: run them with the default device set to ``meta`` and the default dtype set to
float64 while data and parameters are float32 on the CPU. A factory call that forgets
``device=``/``dtype=`` then makes a meta tensor (mixing it with CPU tensors raises) or a float64
one (which would promote the float32 results)."""

import numpy as np
import pytest
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.closed_form import closed_form_loss
from pima_pyro.inference.posterior import cluster_log_posterior, predict_modality
from pima_pyro.inference.svi import minibatch, per_sample_loss


@pytest.fixture(scope="module")
def fitted():
    data = digits_affine(seed=0).subset(np.arange(200))
    model = PIMA(
        affine_modalities(hidden=(16,)), n_clusters=10, latent_dim=3, bayesian_globals=True
    )
    model.fit(data, epochs=1, seed=0, progress=False, jit=False)
    return model, data


class _ForeignDefaults:
    def __enter__(self):
        self.dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        self.device = torch.device("meta")
        self.device.__enter__()

    def __exit__(self, *exc):
        self.device.__exit__(*exc)
        torch.set_default_dtype(self.dtype)


@pytest.mark.parametrize("objective", ["elbo", "closed_form"])
def test_training_step_follows_data_device_and_dtype(fitted, objective):
    model, data = fitted
    net = model.module
    full = data.to_batch(device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(32)
    loss_fn = (
        per_sample_loss(net, full.n_total)
        if objective == "elbo"
        else (lambda b: closed_form_loss(net, b))
    )
    with _ForeignDefaults():
        batch = minibatch(full, idx, True, gen)
        loss = loss_fn(batch)
        loss.backward()
    assert loss.device.type == "cpu" and loss.dtype == torch.float32
    for name, p in net.named_parameters():
        if p.grad is not None:
            assert p.grad.device.type == "cpu" and p.grad.dtype == torch.float32, name
    net.zero_grad(set_to_none=True)


def test_queries_follow_data_device_and_dtype(fitted):
    model, data = fitted
    net = model.module
    batch = data.to_batch(device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with _ForeignDefaults():
        log_pc = cluster_log_posterior(net, batch, ["image"], generator=gen)
        pred = predict_modality(net, batch, ["image"], "curve", num_samples=8, generator=gen)
        pred_x = predict_modality(net, batch, ["curve"], "image", num_samples=4, generator=gen)
    for out in (log_pc, pred.mean, pred.samples, pred_x.mean, pred_x.lower):
        assert out.device.type == "cpu" and out.dtype == torch.float32
