"""Model files and checkpoints that can be trusted: no code runs on load, corruption is caught,
resume refuses foreign checkpoints and falls back to the previous good one."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pima_pyro import PIMA, GaussianModality, PhysicsModality
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.files import PIMAFileError
from pima_pyro.models.experts import Custom

FAST = dict(batch_size=32, seed=0, progress=False, num_threads=1, logger=False)


def power_law(t, a, p):
    """A module-level Custom function: stored by its import path."""
    return a * (t + 0.1) ** p


@pytest.fixture(scope="module")
def small():
    return digits_affine(seed=0).subset(np.arange(96))


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    model = PIMA(affine_modalities(hidden=(16,)), n_clusters=4, latent_dim=2)
    model.fit(small, epochs=1, **FAST)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    model.save(path)
    return model, path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_model_file_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": 2, "header": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(PIMAFileError, match="evil.pt"):
        PIMA.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_changed_weight_is_refused_naming_the_file(saved, tmp_path):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    key = next(k for k, v in payload["tensors"].items() if v.is_floating_point())
    payload["tensors"][key].view(-1)[0] += 1.0
    torch.save(payload, tmp_path / "flipped.pt")
    with pytest.raises(PIMAFileError, match="flipped.pt.*corrupted"):
        PIMA.load(tmp_path / "flipped.pt")


def test_random_corruptions_load_the_same_model_or_raise_the_file_error(saved, small, tmp_path):
    model, path = saved
    original = path.read_bytes()
    expected = model.cluster_posterior(small, given=["curve"])
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "identical": 0}
    for trial in range(240):
        data = bytearray(original)
        kind = trial % 3
        if kind == 0:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 1:  # flip 1-8 bytes
            for pos in rng.integers(0, len(data), int(rng.integers(1, 9))):
                data[pos] ^= int(rng.integers(1, 256))
        else:  # zero a region
            start = int(rng.integers(0, len(data)))
            data[start : start + int(rng.integers(1, 4096))] = bytes(
                len(data[start : start + 4096])
            )[: len(data[start : start + int(rng.integers(1, 4096))])]
        corrupted = tmp_path / f"c{trial}.pt"
        corrupted.write_bytes(bytes(data))
        try:
            loaded = PIMA.load(corrupted)
        except PIMAFileError:
            outcomes["refused"] += 1
            continue
        np.testing.assert_array_equal(loaded.cluster_posterior(small, given=["curve"]), expected)
        outcomes["identical"] += 1
    print(f"corruptions: {outcomes}")
    assert sum(outcomes.values()) == 240 and outcomes["refused"] > 200


def test_custom_expert_round_trips_by_import_path_and_a_lambda_is_refused(small, tmp_path):
    def specs(fn):
        expert = Custom(fn, {"a": (1,), "p": (1,)}, init={"a": [1.0], "p": [1.0]})
        return {"image": GaussianModality(hidden=(16,)), "curve": PhysicsModality(expert=expert)}

    model = PIMA(specs(power_law), n_clusters=3, latent_dim=2)
    model.fit(small, epochs=1, **FAST)
    model.save(tmp_path / "custom.pt")
    loaded = PIMA.load(tmp_path / "custom.pt")
    assert loaded.specs["curve"].expert.fn is power_law
    np.testing.assert_allclose(
        loaded.cluster_posterior(small, given=["curve"]),
        model.cluster_posterior(small, given=["curve"]),
    )
    lam = PIMA(specs(lambda t, a, p: a * (t + 0.1) ** p), n_clusters=3, latent_dim=2)
    lam.fit(small, epochs=1, **FAST)
    with pytest.raises(ValueError, match="not importable"):
        lam.save(tmp_path / "lambda.pt")
    assert not list(tmp_path.glob("lambda.pt*"))  # nothing written, no temporary left
    # re-supplied at load instead
    model.save(tmp_path / "again.pt")
    again = PIMA.load(tmp_path / "again.pt", experts={"curve": specs(power_law)["curve"].expert})
    assert again.specs["curve"].expert.fn is power_law


def _fit(data, ckpt, epochs=3, **kwargs):
    model = PIMA(affine_modalities(hidden=(16,)), n_clusters=4, latent_dim=2)
    model.fit(data, epochs=epochs, checkpoint_dir=ckpt, **{**FAST, **kwargs})
    return model


def test_resume_refuses_a_checkpoint_of_other_data_naming_the_difference(small, tmp_path):
    _fit(small, tmp_path)
    other = digits_affine(seed=1).subset(np.arange(96))  # same shapes, other values
    with pytest.raises(ValueError, match="data_digest"):
        _fit(other, tmp_path, resume=True)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_corrupted(small, tmp_path):
    reference = _fit(small, tmp_path / "ref", epochs=4)
    _fit(small, tmp_path / "run", epochs=4)
    last, previous = tmp_path / "run" / "checkpoint.ckpt", tmp_path / "run" / "checkpoint.prev.ckpt"
    assert previous.exists()
    # a run killed after epoch 3 of 4: its last checkpoint is the one of epoch 3
    previous_payload = torch.load(previous, weights_only=True)
    assert previous_payload["pima"]["epochs_completed"] == 3
    raw = bytearray(last.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    last.write_bytes(bytes(raw))
    (tmp_path / "run" / "checkpoint.ckpt.abc123.tmp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="previous checkpoint"):
        resumed = _fit(small, tmp_path / "run", epochs=4, resume=True)
    a, b = reference.module.state_dict(), resumed.module.state_dict()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) == 0.0
    assert not list((tmp_path / "run").glob("*.tmp"))
    # both corrupted: the file error, naming the file
    for path in (last, previous):
        path.write_bytes(b"not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PIMAFileError, match="checkpoint"):
            _fit(small, tmp_path / "run", epochs=4, resume=True)


def test_a_function_path_cannot_reach_into_another_module():
    from pima_pyro.files import resolve_function

    with pytest.raises(PIMAFileError, match="defined in pima_pyro.files"):
        resolve_function("pima_pyro.files:os.system", "modality 'curve'")
    with pytest.raises(PIMAFileError, match="not in a module this process has imported"):
        resolve_function("os:system", "modality 'curve'")
