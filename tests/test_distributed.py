"""Lightning's DDP on gloo: two processes of 32 samples take the steps one process takes on the
same global batches of 64, with the EM start, a warm-up and checkpoints on; a DDP run killed
mid-training resumes to the same parameters."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine

SETTINGS = dict(seed=1, warmup_epochs=1, progress=False, num_threads=1)


def _data():
    return digits_affine(seed=0).subset(np.arange(256))


def _model():
    return PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_processes_equal_one_process_on_the_same_batches(tmp_path):
    single = _model()
    h1 = single.fit(_data(), epochs=3, batch_size=64, checkpoint_dir=tmp_path / "a", **SETTINGS)
    double = _model()
    h2 = double.fit(
        _data(), epochs=3, batch_size=32, strategy="ddp", devices=2,
        checkpoint_dir=tmp_path / "b", **SETTINGS,
    )  # fmt: skip
    a, b = single.module.state_dict(), double.module.state_dict()
    max_diff = _max_diff(a, b)
    print(f"ddp max abs diff: {max_diff:.3g}")
    assert max_diff <= 1e-5
    np.testing.assert_allclose(h1.loss, h2.loss, rtol=1e-5)
    assert h2.phase == ["warmup", "full", "full"]
    assert (tmp_path / "b" / "checkpoint.ckpt").exists()
    # and training moved the parameters (the comparison is not between two untouched copies)
    fresh = _model()
    torch.manual_seed(1)
    fresh.module = fresh._build(_data())
    moved = max(
        (a[k] - v).abs().max().item()
        for k, v in fresh.module.state_dict().items()
        if "encoder" in k
    )
    assert moved > 1e-3


SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from pima_pyro import PIMA
    from pima_pyro.datasets import affine_modalities, digits_affine
    if __name__ == "__main__":  # spawned workers import this file
        data = digits_affine(seed=0).subset(np.arange(256))
        model = PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)
        ckpt, out = sys.argv[1], sys.argv[2]
        model.fit(data, epochs=EPOCHS, batch_size=32, strategy="ddp", devices=2, seed=1,
                  warmup_epochs=1, progress=False, num_threads=1, checkpoint_dir=ckpt,
                  resume=True)
        torch.save(model.module.state_dict(), out)
    """
)
EPOCHS = 30


def _completed(path):
    try:
        return torch.load(path, weights_only=True)["pima"]["epochs_completed"]
    except Exception:  # not written yet
        return 0


def test_killed_ddp_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("EPOCHS", str(EPOCHS)))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    run = [sys.executable, str(script), str(ckpt), str(out)]
    proc = subprocess.Popen(run, start_new_session=True)
    deadline = time.time() + 60
    while _completed(ckpt / "checkpoint.ckpt") < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    killed_at = _completed(ckpt / "checkpoint.ckpt")
    assert 3 <= killed_at < EPOCHS and not out.exists()
    assert subprocess.run(run).returncode == 0
    uninterrupted = [sys.executable, str(script), str(tmp_path / "ref"), str(tmp_path / "ref.pt")]
    assert subprocess.run(uninterrupted).returncode == 0
    reference = torch.load(tmp_path / "ref.pt", weights_only=True)
    max_diff = _max_diff(reference, torch.load(out, weights_only=True))
    print(f"killed at epoch {killed_at}; resumed vs uninterrupted max abs diff {max_diff:.3g}")
    assert max_diff == 0.0
