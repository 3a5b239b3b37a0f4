"""End-to-end: recover known clusters and slopes; save/load; JIT; the demo command."""

import json

import numpy as np
import pytest
import torch

from pima_pyro import PIMA
from pima_pyro.cli import main
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.metrics import matched_accuracy


@pytest.fixture(scope="module")
def fitted():
    data = digits_affine(seed=0).subset(np.arange(700))
    train, test = data.train_test_split(0.3, seed=0)
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    model.fit(train, epochs=60, batch_size=128, seed=0, progress=False, num_threads=1)
    return model, train, test


def test_recovers_clusters_and_slopes_on_small_digits(fitted):
    model, train, test = fitted
    joint, mapping = matched_accuracy(train.labels.numpy(), model.predict_clusters(train))
    assert joint >= 0.97
    slopes = model.physics_parameters()["curve"]["theta"][:, 0]
    assert max(abs(slopes[c] - label) for c, label in mapping.items()) <= 0.2
    image_only, _ = matched_accuracy(
        test.labels.numpy(), model.predict_clusters(test, given=["image"])
    )
    assert image_only >= 0.6  # far above chance (0.1) after 60 short epochs
    assert model.history is not None and model.history.loss[-1] < model.history.loss[0]


def test_cross_modal_prediction_of_curve_from_image(fitted):
    model, _, test = fitted
    pred = model.predict(test, given=["image"], target="curve", num_samples=100)
    truth = test.labels.numpy()[:, None] * test.grids["curve"].numpy()[None]
    rel = np.linalg.norm(pred.mean.numpy() - truth) / np.linalg.norm(truth)
    assert rel < 0.5
    inside = (pred.lower.numpy() <= test.values["curve"].numpy()) & (
        test.values["curve"].numpy() <= pred.upper.numpy()
    )
    assert inside.mean() > 0.6  # nominal 0.9; misassigned clusters cost coverage


def test_save_load_round_trip_reproduces_posterior(fitted, tmp_path):
    model, _, test = fitted
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = PIMA.load(path)
    np.testing.assert_array_equal(
        loaded.cluster_posterior(test, given=["image"]),
        model.cluster_posterior(test, given=["image"]),
    )
    np.testing.assert_array_equal(
        loaded.get_latent_representation(test), model.get_latent_representation(test)
    )
    assert loaded.history.loss == model.history.loss


def test_load_refuses_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="not a pima-pyro model file"):
        PIMA.load(path)


def test_same_seed_same_parameters_and_jit_trains():
    data = digits_affine(seed=1).subset(np.arange(300))
    runs = []
    for jit in (False, False, True):
        model = PIMA(affine_modalities(), n_clusters=10, latent_dim=3)
        model.fit(data, epochs=3, batch_size=64, seed=3, progress=False, jit=jit)
        runs.append(model)
    a, b, c = (r.module.state_dict() for r in runs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert all(np.isfinite(runs[2].history.loss))
    assert abs(runs[2].history.loss[-1] - runs[0].history.loss[-1]) < 0.2 * abs(
        runs[0].history.loss[-1]
    )


def test_missing_modalities_train_and_query_without_nan():
    data = digits_affine(seed=0).subset(np.arange(400))
    rng = np.random.default_rng(0)
    masks = {n: rng.random(400) > 0.3 for n in data.names}
    partial = type(data)(
        {n: data.values[n].numpy() for n in data.names},
        masks=masks,
        grids={"curve": data.grids["curve"].numpy()},
        labels=data.labels.numpy(),
    )
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    model.fit(partial, epochs=20, seed=0, progress=False)
    post = model.cluster_posterior(partial)
    assert np.isfinite(post).all() and np.allclose(post.sum(1), 1.0, atol=1e-5)
    both = masks["curve"]
    acc, _ = matched_accuracy(partial.labels.numpy()[both], post.argmax(1)[both])
    assert acc >= 0.9  # samples with a curve are assigned by the physics expert


def test_demo_command_prints_metrics_json_last(tmp_path, capsys):
    assert main(["demo", "--epochs", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    for key in (
        "joint_accuracy",
        "image_only_test_accuracy",
        "curve_only_test_accuracy",
        "slope_max_abs_error",
        "curve_from_image_rel_l2",
        "seconds",
    ):
        assert key in metrics
    assert metrics["curve_only_test_accuracy"] > 0.9  # EM on the curves alone already does this
    for name in ("loss.png", "latent.png", "physics_fits.png", "history.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_meets_acceptance(tmp_path, capsys, seed):
    assert main(["demo", "--seed", str(seed), "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["joint_accuracy"] >= 0.97
    assert metrics["image_only_test_accuracy"] >= 0.92
    assert metrics["slope_max_abs_error"] <= 0.15
