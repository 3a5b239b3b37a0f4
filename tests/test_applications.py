"""The seed's applications on small settings: each claim holds with a stated margin."""

import numpy as np
import torch

from pima_pyro import PIMA, MultimodalData
from pima_pyro.datasets import (
    affine_modalities,
    digits_affine,
    lattice,
    lattice_modalities,
    lattice_truth,
    pvd,
    pvd_modalities,
    tribology,
    tribology_modalities,
)
from pima_pyro.metrics import matched_accuracy, relative_l2
from pima_pyro.models.experts import BilinearStressStrain


def test_lattice_images_identify_population_and_predict_the_curve():
    train, test = lattice(n_per_population=80, seed=0).train_test_split(0.3, seed=0)
    model = PIMA(lattice_modalities(), n_clusters=2, latent_dim=4)
    model.fit(train, epochs=60, batch_size=32, seed=0, progress=False)
    accuracy, _ = matched_accuracy(
        test.labels.numpy(), model.predict_clusters(test, given=["image"])
    )
    assert accuracy >= 0.9
    predicted = model.predict(test, given=["image"], target="curve").mean.numpy()
    truth = test.values["curve"].numpy()
    oracle = BilinearStressStrain().expected_curve(
        torch.tensor(lattice_truth(2)[test.labels.numpy()]), test.grids["curve"].double()
    )
    assert relative_l2(predicted, truth) <= 1.5 * relative_l2(oracle.numpy(), truth)
    # the recovered per-cluster physics matches the truth (E within 3%, yield strain within 0.003)
    theta = model.physics_parameters()["curve"]["theta"]
    theta = theta[np.argsort(theta[:, 1])]
    np.testing.assert_allclose(theta[:, 0], lattice_truth(2)[:, 0], rtol=0.03)
    np.testing.assert_allclose(theta[:, 1], lattice_truth(2)[:, 1], atol=0.003)


def test_pvd_all_inputs_predict_x4_better_than_every_strict_subset():
    train, test = pvd(n_samples=400, seed=0).train_test_split(0.3, seed=0)
    model = PIMA(pvd_modalities(), n_clusters=3, latent_dim=4)
    model.fit(train, epochs=40, batch_size=64, seed=0, progress=False)
    truth = test.values["X4"].numpy()

    def error(given):
        return relative_l2(model.predict(test, given=given, target="X4").mean.numpy(), truth)

    full = error(["X1", "X2", "X3"])  # every input but the target
    for given in (
        ["X1", "X2"],
        ["X1", "X3"],
        ["X2", "X3"],
        ["X1"],
        ["X2"],
        ["X3"],
    ):
        assert error(given) > full, given
    # three inputs carry more than any single one
    assert full < min(error(["X1"]), error(["X2"]), error(["X3"]))


def test_tribology_acoustic_emission_alone_identifies_the_regime():
    train, test = tribology(n_samples=300, seed=0).train_test_split(0.3, seed=0)
    model = PIMA(tribology_modalities(), n_clusters=2, latent_dim=4)
    model.fit(train, epochs=40, batch_size=64, seed=0, progress=False)
    labels = test.labels.numpy()
    acoustic, _ = matched_accuracy(labels, model.predict_clusters(test, given=["acoustic"]))
    everything, _ = matched_accuracy(labels, model.predict_clusters(test))
    assert everything >= 0.97
    assert acoustic >= 0.75  # chance is 0.5


def test_training_with_30_percent_of_images_missing():
    """30% of the (non-physics) images removed at random: clusters and image-only queries hold."""
    data = digits_affine(seed=0)
    rng = np.random.default_rng(0)
    image_mask = rng.random(data.n_samples) >= 0.3
    partial = MultimodalData(
        {n: data.values[n].numpy() for n in data.names},
        masks={"image": image_mask},
        grids={"curve": data.grids["curve"].numpy()},
        labels=data.labels.numpy(),
    )
    train, test = partial.train_test_split(0.3, seed=0)
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    model.fit(train, epochs=120, seed=0, progress=False)
    joint, _ = matched_accuracy(train.labels.numpy(), model.predict_clusters(train))
    assert joint >= 0.97
    has_image = test.masks["image"].numpy()
    image_only, _ = matched_accuracy(
        test.labels.numpy()[has_image],
        model.predict_clusters(test, given=["image"])[has_image],
    )
    assert image_only >= 0.85
    latent = model.get_latent_representation(test, given=["image"])
    assert np.isfinite(latent).all()
