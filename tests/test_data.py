"""MultimodalData validation and bookkeeping; bad input names the modality and the field."""

import numpy as np
import pytest
import torch

from pima_pyro import PIMA, GaussianModality, LinearThroughOrigin, MultimodalData, PhysicsModality


def _ok(n=10):
    rng = np.random.default_rng(0)
    return {"image": rng.random((n, 4, 4)), "curve": rng.random((n, 6))}


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        (
            {"modalities": {"image": np.zeros((10, 4)), "curve": np.zeros((9, 6))}},
            ValueError,
            "modality 'curve': values have 9 samples",
        ),
        (
            {"modalities": {"image": np.full((3, 2), np.nan)}},
            ValueError,
            "modality 'image': values contain NaN",
        ),
        (
            {"modalities": {"image": np.array([[1.0, np.inf]])}},
            ValueError,
            "modality 'image': values contain NaN or inf",
        ),
        ({"modalities": {"image": np.array(["a", "b"])}}, TypeError, "modality 'image'"),
        ({"modalities": {}}, ValueError, "non-empty"),
        (
            {"modalities": {"image": np.zeros((0, 3))}},
            ValueError,
            "modality 'image': values are empty",
        ),
        (
            {"modalities": _ok(), "masks": {"curve": np.ones(5, bool)}},
            ValueError,
            r"modality 'curve': mask must have shape \(10,\)",
        ),
        (
            {"modalities": _ok(), "masks": {"spectrum": np.ones(10, bool)}},
            ValueError,
            "unknown modalities \\['spectrum'\\]",
        ),
        (
            {"modalities": _ok(), "grids": {"curve": np.linspace(0, 1, 5)}},
            ValueError,
            r"modality 'curve': grid must have shape \(6,\)",
        ),
        (
            {"modalities": _ok(), "grids": {"curve": np.array([0, 1, 1, 2, 3, 4.0])}},
            ValueError,
            "modality 'curve': grid must be finite and strictly increasing",
        ),
        (
            {"modalities": _ok(), "labels": np.zeros(3)},
            ValueError,
            r"labels: expected shape \(10,\)",
        ),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        MultimodalData(**kwargs)


def test_nan_as_missing_masks_and_zero_fills():
    x = np.ones((4, 3))
    x[1, 2] = np.nan
    data = MultimodalData({"a": x}, nan_as_missing=True)
    assert data.masks["a"].tolist() == [True, False, True, True]
    assert torch.isfinite(data.values["a"]).all() and data.values["a"][1].abs().sum() == 0


def test_masked_rows_are_zero_filled_and_nan_there_is_allowed():
    x = np.ones((3, 2))
    x[0] = np.nan
    data = MultimodalData({"a": x}, masks={"a": [False, True, True]})
    assert data.values["a"][0].tolist() == [0.0, 0.0]


def test_scalar_modality_becomes_a_column_and_split_is_disjoint():
    data = MultimodalData({"stress": np.arange(20.0)}, labels=np.arange(20) % 2)
    assert data.feature_shape("stress") == (1,)
    train, test = data.train_test_split(0.3, seed=1)
    assert train.n_samples == 14 and test.n_samples == 6
    both = sorted(train.values["stress"][:, 0].tolist() + test.values["stress"][:, 0].tolist())
    assert both == list(np.arange(20.0))


def _specs():
    return {
        "image": GaussianModality(shape=(4, 4), hidden=(8,)),
        "curve": PhysicsModality(expert=LinearThroughOrigin(), hidden=(8,)),
    }


def test_model_level_validation_names_modality():
    data = MultimodalData(_ok(), grids={"curve": np.linspace(0, 1, 6)})
    with pytest.raises(ValueError, match="n_clusters"):
        PIMA(_specs(), n_clusters=0)
    with pytest.raises(ValueError, match="latent_dim"):
        PIMA(_specs(), latent_dim=0)
    with pytest.raises(TypeError, match="modality 'curve': a PhysicsModality needs expert"):
        PIMA({"curve": PhysicsModality()})
    with pytest.raises(ValueError, match="modality 'image': network must be one of"):
        PIMA({"image": GaussianModality(network="transformer")})
    with pytest.raises(ValueError, match="modality 'image': scale must be a positive"):
        PIMA({"image": GaussianModality(scale=-1.0)})
    wrong = dict(_specs(), image=GaussianModality(shape=(5, 5)))
    with pytest.raises(ValueError, match=r"modality 'image': feature shape \(5, 5\) expected"):
        PIMA(wrong, n_clusters=2).fit(data, epochs=1, progress=False)
    no_grid = MultimodalData(_ok())
    with pytest.raises(ValueError, match="modality 'curve': a physics modality needs its grid"):
        PIMA(_specs(), n_clusters=2).fit(no_grid, epochs=1, progress=False)
    with pytest.raises(ValueError, match="n_clusters=20 exceeds"):
        PIMA(_specs(), n_clusters=20).fit(data, epochs=1, progress=False)
    model = PIMA(_specs(), n_clusters=2, latent_dim=2)
    model.fit(data, epochs=2, progress=False)
    with pytest.raises(ValueError, match="given: unknown modality 'spectrum'"):
        model.cluster_posterior(data, given=["spectrum"])
    with pytest.raises(ValueError, match="target: unknown modality 'xrd'"):
        model.predict(data, given=["image"], target="xrd")
    missing = MultimodalData({"image": _ok()["image"]})
    with pytest.raises(ValueError, match="modality 'curve': missing from the data"):
        model.fit(missing, epochs=1, progress=False)
