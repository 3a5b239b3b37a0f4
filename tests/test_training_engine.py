"""The Lightning engine: validation split, early stopping, history from the logged metrics,
refusals of options it cannot honour, quiet output, and checkpoints that cannot run code."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.svi import validation_loss
from pima_pyro.inference.training import split_validation

FAST = dict(batch_size=32, seed=3, progress=False, num_threads=1)


@pytest.fixture(scope="module")
def small():
    return digits_affine(seed=0).subset(np.arange(160))


def _model():
    return PIMA(affine_modalities(hidden=(16,)), n_clusters=4, latent_dim=2)


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    (path,) = log_dir.glob("pima/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_logged_val_loss_is_the_elbo_of_the_held_out_samples(small, tmp_path):
    model = _model()
    history = model.fit(small, epochs=3, validation_fraction=0.25, log_dir=tmp_path, **FAST)
    rows = _metrics(tmp_path)
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(val) == 3 and len(train) == 3
    # the history is the logged training loss
    np.testing.assert_allclose(history.loss, train, rtol=1e-6)
    # the last logged val_loss is -ELBO / n of the held-out quarter under the final parameters
    _, held_out = split_validation(small, 0.25, seed=3)
    assert held_out.n_samples == 40
    batch = held_out.to_batch(dtype=torch.float32)
    batch.noise = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(val[-1], validation_loss(model.module, batch), rtol=1e-5)
    accuracy = [float(r["val_accuracy"]) for r in rows if r.get("val_accuracy")]
    assert len(accuracy) == 3 and all(0.0 <= a <= 1.0 for a in accuracy)


def test_early_stopping_stops_when_the_validation_elbo_stops_improving(small, tmp_path):
    # lr 1e-12 moves no float32 weight: val_loss repeats exactly, so patience 1 stops at epoch 2
    history = _model().fit(
        small, epochs=10, lr=1e-12, validation_fraction=0.25, early_stopping_patience=1,
        log_dir=tmp_path, **FAST,
    )  # fmt: skip
    assert len(history.loss) == 2
    # and without early stopping the same run goes on to the end
    assert len(_model().fit(small, epochs=4, lr=1e-12, logger=False, **FAST).loss) == 4


@pytest.mark.parametrize(
    "options,named",
    [
        ({"precision": "16-mixed"}, ("precision", "objective")),
        ({"precision": "64-true"}, ("precision", "objective")),
        ({"devices": 2}, ("devices", "strategy")),
        ({"num_nodes": 2}, ("num_nodes", "strategy")),
        ({"seed": 2**32}, ("seed",)),
        ({"strategy": "fsdp"}, ("strategy",)),
        ({"strategy": "ddp", "callback": print}, ("strategy='ddp'", "callback")),
        ({"strategy": "ddp", "on_step": print}, ("strategy='ddp'", "on_step")),
        ({"early_stopping_patience": 3}, ("early_stopping_patience", "validation_fraction")),
        ({"validation_fraction": 1.5}, ("validation_fraction",)),
        ({"device": "cuda:0", "accelerator": "cpu"}, ("device", "accelerator")),
        ({"device": "tpu"}, ("device",)),
    ],
)
def test_options_the_engine_cannot_honour_are_refused_naming_them(small, options, named):
    model = _model()
    with pytest.raises(ValueError) as info:
        model.fit(small, epochs=1, **{**FAST, **options})
    for name in named:
        assert name in str(info.value), (name, str(info.value))
    assert model.module is None  # refused before anything was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_training(small):
    with pytest.raises(ValueError, match=r"not available on this machine; it has \[.cpu.\]"):
        _model().fit(small, epochs=1, device="cuda", **FAST)


def test_fit_prints_no_banner_by_default(small, capfd):
    _model().fit(small, epochs=1, logger=False, **FAST)
    out, err = capfd.readouterr()
    assert "GPU available" not in out + err and "TPU available" not in out + err
    assert "LeafSpec" not in err


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(small, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "ckpt").mkdir()
    torch.save({"pima": _Payload(marker)}, tmp_path / "ckpt" / "checkpoint.ckpt")
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        _model().fit(small, epochs=1, checkpoint_dir=tmp_path / "ckpt", resume=True, **FAST)
    assert not marker.exists()


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(small, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _model().fit(small, epochs=1, checkpoint_dir=path, **FAST)
