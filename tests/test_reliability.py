"""Checkpoints, kill-and-resume, non-finite losses, determinism, save/load."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.svi import NonFiniteELBOError

SETTINGS = dict(epochs=5, batch_size=64, seed=4, progress=False, num_threads=1)


def _data():
    return digits_affine(seed=0).subset(np.arange(300))


def _model():
    return PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from pima_pyro import PIMA
    from pima_pyro.datasets import affine_modalities, digits_affine
    data = digits_affine(seed=0).subset(np.arange(300))
    data.masks["curve"] = torch.arange(300) % 2 == 0  # rows without a curve: self-training
    model = PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)
    mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]

    def kill_mid_epoch(epoch, step):
        if mode == "kill" and epoch == 2 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    # self_training_ramp=1: the weight differs in every epoch, so a resume must know its epoch
    model.fit(data, epochs=5, batch_size=64, seed=4, progress=False, num_threads=1,
              self_training_ramp=1.0, checkpoint_dir=ckpt, resume=(mode == "resume"),
              on_step=kill_mid_epoch)
    torch.save(model.module.state_dict(), out)
    """
)


def test_kill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.pt"
    killed = subprocess.run([sys.executable, str(script), "kill", str(ckpt), str(out)])
    assert killed.returncode == -signal.SIGKILL
    saved = torch.load(ckpt / "checkpoint.ckpt", weights_only=True)
    # epochs 0 and 1 completed, epoch 2 was killed mid-way
    assert saved["pima"]["epochs_completed"] == 2
    resumed = subprocess.run([sys.executable, str(script), "resume", str(ckpt), str(out)])
    assert resumed.returncode == 0
    reference = _model()
    data = _data()
    data.masks["curve"] = torch.arange(300) % 2 == 0
    reference.fit(data, self_training_ramp=1.0, **SETTINGS)
    resumed_state = torch.load(out, weights_only=True)
    max_diff = max(
        (resumed_state[k].double() - v.double()).abs().max().item()
        for k, v in reference.module.state_dict().items()
    )
    print(f"resume max abs diff: {max_diff:.3g}")
    assert max_diff <= 1e-6
    # the history of the resumed run covers all epochs
    final = torch.load(ckpt / "checkpoint.ckpt", weights_only=True)
    assert final["pima"]["epochs_completed"] == 5
    assert bool(torch.isfinite(final["state_dict"]["history_loss"]).all())


def test_resume_refuses_different_settings(tmp_path):
    model = _model()
    model.fit(_data(), checkpoint_dir=tmp_path, **SETTINGS)
    other = _model()
    with pytest.raises(ValueError, match="cannot resume"):
        other.fit(_data(), checkpoint_dir=tmp_path, resume=True, **{**SETTINGS, "lr": 1e-4})
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        _model().fit(_data(), resume=True, **SETTINGS)


def test_non_finite_elbo_names_step_and_parameter_and_never_writes_nan(tmp_path):
    model = _model()

    def poison(epoch, step):
        if epoch == 1 and step == 2:
            with torch.no_grad():
                model.module.modalities["image"].decoder.body[0].weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteELBOError) as info:
        model.fit(_data(), checkpoint_dir=tmp_path, on_step=poison, **SETTINGS)
    message = str(info.value)
    assert "epoch 1, step 3" in message
    assert "modalities.image.decoder.body.0.weight" in message
    assert "x_image (model)" in message
    saved = torch.load(tmp_path / "checkpoint.ckpt", weights_only=True)
    assert saved["pima"]["epochs_completed"] == 1
    assert all(
        torch.isfinite(v).all() for k, v in saved["state_dict"].items() if k.startswith("net.")
    )
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_same_seed_same_result_different_seed_differs():
    runs = []
    for seed in (7, 7, 8):
        model = _model()
        model.fit(_data(), **{**SETTINGS, "epochs": 2, "seed": seed})
        runs.append(model.module.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key])
    assert any(
        not torch.equal(runs[0][k], runs[2][k]) for k in runs[0] if runs[0][k].is_floating_point()
    )


def test_saved_file_states_versions_and_loads_on_cpu(tmp_path):
    import json

    from pima_pyro.files import PIMAFileError, digest

    model = _model()
    model.fit(_data(), **{**SETTINGS, "epochs": 1})
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    header = json.loads(payload["header"])
    assert set(header["versions"]) == {"pima_pyro", "torch", "pyro"}
    loaded = PIMA.load(tmp_path / "m.pt", map_location="cpu")
    assert loaded.device.type == "cpu"
    np.testing.assert_array_equal(loaded.predict_clusters(_data()), model.predict_clusters(_data()))
    torch.save({**payload, "format": 999}, tmp_path / "future.pt")
    with pytest.raises(PIMAFileError, match="not a pima-pyro model file of format"):
        PIMA.load(tmp_path / "future.pt")
    header["versions"]["pima_pyro"] = "99.0.0"
    text = json.dumps(header, sort_keys=True)
    newer = {**payload, "header": text, "digest": digest(text, payload["tensors"])}
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(PIMAFileError, match="written by pima-pyro 99.0.0, newer than"):
        PIMA.load(tmp_path / "newer.pt")
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries
    assert os.path.getsize(tmp_path / "m.pt") > 0


class _Interrupt(Exception):
    pass


def test_resume_restores_the_global_rng_that_draws_the_variational_globals(tmp_path):
    """Under bayesian_globals the guide draws pi and theta from torch's global RNG: a run
    interrupted mid-epoch and resumed (in a process whose RNG has moved on) ends where an
    uninterrupted run ends only if the checkpoint restores that RNG."""

    def model():
        return PIMA(
            affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3, bayesian_globals=True
        )

    def interrupt(epoch, step):
        if epoch == 2 and step == 1:
            raise _Interrupt

    settings = {**SETTINGS, "jit": False}
    reference = model()
    reference.fit(_data(), **settings)
    with pytest.raises(_Interrupt):
        model().fit(_data(), checkpoint_dir=tmp_path, on_step=interrupt, **settings)
    torch.rand(1000)  # this process's RNG moves on, as a new process's would differ
    resumed = model()
    resumed.fit(_data(), checkpoint_dir=tmp_path, resume=True, **settings)
    a, b = reference.module.state_dict(), resumed.module.state_dict()
    max_diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert max_diff == 0.0


def test_a_nan_in_the_mixture_weights_is_diagnosed_and_the_last_good_state_kept(tmp_path):
    """A NaN that breaks even the diagnosis's own trace (the cluster cannot be sampled) still
    gives NonFiniteELBOError naming the parameter, with finite parameters in memory."""
    model = _model()

    def poison(epoch, step):
        if epoch == 1 and step == 1:
            with torch.no_grad():
                model.module.mixture.logits[0] = float("nan")

    with pytest.raises(NonFiniteELBOError, match="mixture.logits"):
        model.fit(_data(), checkpoint_dir=tmp_path, on_step=poison, **SETTINGS)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    saved = torch.load(tmp_path / "checkpoint.ckpt", weights_only=True)
    assert saved["pima"]["epochs_completed"] == 1
