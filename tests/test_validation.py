"""Every entry point rejects bad input with a ValueError/TypeError naming the modality/field.

The table below is mirrored in docs/validation.md.
"""

import numpy as np
import pyro.distributions
import pytest
import torch

from pima_pyro import (
    PIMA,
    Custom,
    GaussianModality,
    LinearThroughOrigin,
    MultimodalData,
    PhysicsModality,
)

RNG = np.random.default_rng(0)
IMAGES = RNG.random((12, 4, 4))
CURVES = RNG.random((12, 6))
GRID = np.linspace(0, 1, 6)


def good_data(**overrides):
    kwargs = dict(modalities={"image": IMAGES, "curve": CURVES}, grids={"curve": GRID})
    kwargs.update(overrides)
    return MultimodalData(**kwargs)


def specs(**overrides):
    out = {
        "image": GaussianModality(shape=(4, 4), hidden=(8,)),
        "curve": PhysicsModality(expert=LinearThroughOrigin(), hidden=(8,)),
    }
    out.update(overrides)
    return out


@pytest.fixture(scope="module")
def fitted():
    model = PIMA(specs(), n_clusters=2, latent_dim=2)
    model.fit(good_data(), epochs=1, progress=False)
    return model


def bad_output_shape(t, a):
    return a * t[:-1]  # one point short of the grid


CASES = [
    # (id, callable, exception, message fragment)
    (
        "sample counts differ",
        lambda m: MultimodalData({"image": IMAGES, "curve": CURVES[:5]}),
        ValueError,
        "modality 'curve': values have 5 samples but modality 'image' has 12",
    ),
    (
        "NaN in observed values",
        lambda m: MultimodalData({"curve": np.full((3, 6), np.nan)}),
        ValueError,
        "modality 'curve': values contain NaN or inf",
    ),
    (
        "inf in observed values",
        lambda m: MultimodalData({"curve": np.array([[0.0, np.inf]])}),
        ValueError,
        "modality 'curve': values contain NaN or inf",
    ),
    (
        "string dtype",
        lambda m: MultimodalData({"curve": np.array([["a", "b"]])}),
        TypeError,
        "modality 'curve': values must be numeric",
    ),
    (
        "complex dtype",
        lambda m: MultimodalData({"curve": np.ones((2, 2), dtype=complex)}),
        TypeError,
        "modality 'curve': values must be numeric",
    ),
    (
        "empty data",
        lambda m: MultimodalData({"curve": np.zeros((0, 6))}),
        ValueError,
        "modality 'curve': values are empty",
    ),
    ("no modalities", lambda m: MultimodalData({}), ValueError, "non-empty mapping"),
    (
        "mask of wrong length",
        lambda m: good_data(masks={"image": np.ones(3, bool)}),
        ValueError,
        r"modality 'image': mask must have shape \(12,\)",
    ),
    (
        "mask not boolean",
        lambda m: good_data(masks={"image": np.full(12, 0.5)}),
        ValueError,
        "modality 'image': mask must be boolean",
    ),
    (
        "mask for unknown modality",
        lambda m: good_data(masks={"xrd": np.ones(12, bool)}),
        ValueError,
        r"masks name unknown modalities \['xrd'\]",
    ),
    (
        "grid of wrong length",
        lambda m: good_data(grids={"curve": GRID[:4]}),
        ValueError,
        r"modality 'curve': grid must have shape \(6,\)",
    ),
    (
        "grid not increasing",
        lambda m: good_data(grids={"curve": GRID[::-1]}),
        ValueError,
        "modality 'curve': grid must be finite and strictly increasing",
    ),
    (
        "labels of wrong length",
        lambda m: good_data(labels=np.zeros(3)),
        ValueError,
        r"labels: expected shape \(12,\)",
    ),
    ("n_clusters < 1", lambda m: PIMA(specs(), n_clusters=0), ValueError, "n_clusters must be"),
    (
        "n_clusters > n_samples",
        lambda m: PIMA(specs(), n_clusters=50).fit(good_data(), epochs=1),
        ValueError,
        "n_clusters=50 exceeds the 12 samples",
    ),
    ("latent_dim < 1", lambda m: PIMA(specs(), latent_dim=0), ValueError, "latent_dim must be"),
    (
        "spec of wrong type",
        lambda m: PIMA({"image": "gaussian"}),
        TypeError,
        "modality 'image': expected a Modality spec",
    ),
    (
        "physics modality without expert",
        lambda m: PIMA({"curve": PhysicsModality()}),
        TypeError,
        "modality 'curve': a PhysicsModality needs expert",
    ),
    (
        "unknown network",
        lambda m: PIMA(specs(image=GaussianModality(network="vit"))),
        ValueError,
        "modality 'image': network must be one of",
    ),
    (
        "negative likelihood scale",
        lambda m: PIMA(specs(image=GaussianModality(scale=0.0))),
        ValueError,
        "modality 'image': scale must be a positive float",
    ),
    (
        "feature shape mismatch",
        lambda m: PIMA(specs(image=GaussianModality(shape=(5, 5))), n_clusters=2).fit(
            good_data(), epochs=1
        ),
        ValueError,
        r"modality 'image': feature shape \(5, 5\) expected, data has \(4, 4\)",
    ),
    (
        "physics grid missing",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(grids={}), epochs=1),
        ValueError,
        "modality 'curve': a physics modality needs its grid",
    ),
    (
        "expert output does not match grid",
        lambda m: PIMA(
            specs(curve=PhysicsModality(expert=Custom(bad_output_shape, {"a": (1,)}))), n_clusters=2
        ).fit(good_data(), epochs=1),
        ValueError,
        r"modality 'curve': expert Custom returns curves of shape \(2, 5\); expected \(2, 6\)",
    ),
    (
        "modality missing from data",
        lambda m: PIMA(specs(), n_clusters=2).fit(MultimodalData({"image": IMAGES}), epochs=1),
        ValueError,
        "modality 'curve': missing from the data",
    ),
    (
        "fit on a non-data object",
        lambda m: PIMA(specs()).fit({"image": IMAGES}),
        TypeError,
        "fit: expected MultimodalData",
    ),
    (
        "epochs < 1",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), epochs=0),
        ValueError,
        "fit: epochs must be >= 1",
    ),
    (
        "non-positive learning rate",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), lr=-1.0),
        ValueError,
        "fit: lr must be a finite number > 0",
    ),
    (
        "unknown modality in given",
        lambda m: m.cluster_posterior(good_data(), given=["xrd"]),
        ValueError,
        "given: unknown modality 'xrd'",
    ),
    (
        "given modality absent from data",
        lambda m: m.cluster_posterior(MultimodalData({"image": IMAGES}), given=["curve"]),
        ValueError,
        "given: modality 'curve' is not in the data",
    ),
    (
        "negative num_samples",
        lambda m: m.cluster_posterior(good_data(), num_samples=-1),
        ValueError,
        "cluster_posterior: num_samples must be an int >= 0",
    ),
    (
        "unknown prediction target",
        lambda m: m.predict(good_data(), given=["image"], target="xrd"),
        ValueError,
        "target: unknown modality 'xrd'",
    ),
    (
        "interval outside (0, 1)",
        lambda m: m.predict(good_data(), given=["image"], target="curve", interval=1.5),
        ValueError,
        "predict: interval must be in",
    ),
    (
        "query grid differs from the fitted grid",
        lambda m: m.cluster_posterior(good_data(grids={"curve": GRID * 2}), given=["curve"]),
        ValueError,
        "modality 'curve': grid differs from the grid the model was fitted on",
    ),
    (
        "query feature shape differs",
        lambda m: m.get_latent_representation(
            MultimodalData({"image": RNG.random((3, 5, 5))}), given=["image"]
        ),
        ValueError,
        r"modality 'image': feature shape \(4, 4\) expected",
    ),
    # ---- issue 10: inputs that used to be accepted silently or fail deep inside torch ----
    (
        "a modality given twice",
        lambda m: m.cluster_posterior(good_data(), given=["curve", "curve"]),
        ValueError,
        "given: each modality at most once",
    ),
    (
        "other grid with given=None",
        lambda m: m.cluster_posterior(good_data(grids={"curve": GRID * 2})),
        ValueError,
        "modality 'curve': grid differs",
    ),
    (
        "data with none of the model's modalities",
        lambda m: m.get_latent_representation(MultimodalData({"xrd": CURVES})),
        ValueError,
        "none of its modalities",
    ),
    (
        "boolean mask of the wrong length",
        lambda m: good_data().subset(np.ones(5, dtype=bool)),
        ValueError,
        "subset: a boolean mask needs shape",
    ),
    (
        "float indices",
        lambda m: good_data().subset(np.array([0.5, 1.0])),
        TypeError,
        "subset: indices must be integers",
    ),
    (
        "fractional labels",
        lambda m: good_data(labels=np.full(12, 0.7)),
        ValueError,
        "labels: expected integer class labels",
    ),
    (
        "NaN labels",
        lambda m: good_data(labels=np.full(12, np.nan)),
        ValueError,
        "labels: expected integer class labels",
    ),
    (
        "negative clip_norm",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), clip_norm=-1),
        ValueError,
        "fit: clip_norm must be a finite number > 0",
    ),
    (
        "fractional batch size",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), batch_size=32.5),
        TypeError,
        "fit: batch_size must be an integer",
    ),
    (
        "epochs as a string",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), epochs="3"),
        TypeError,
        "fit: epochs must be an integer",
    ),
    (
        "infinite epochs",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), epochs=float("inf")),
        TypeError,
        "fit: epochs must be an integer",
    ),
    (
        "infinite learning rate",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), lr=float("inf")),
        ValueError,
        "fit: lr must be a finite number > 0",
    ),
    (
        "bool n_clusters",
        lambda m: PIMA(specs(), n_clusters=True),
        TypeError,
        "PIMA: n_clusters must be an integer",
    ),
    (
        "unknown fit option",
        lambda m: PIMA(specs(), n_clusters=2).fit(good_data(), epoch=3),
        TypeError,
        r"fit: unknown option\(s\) \['epoch'\]",
    ),
    (
        "a device this machine lacks",
        lambda m: PIMA.load(__file__, map_location="cuda:7"),
        ValueError,
        "is not available on this machine",
    ),
    (
        "Custom returning numpy",
        lambda m: PIMA(
            specs(curve=PhysicsModality(expert=Custom(lambda t, a: np.ones(6), {"a": (1,)})))
        ).fit(good_data(), epochs=1),
        ValueError,
        "must return a torch.Tensor",
    ),
    (
        "Custom returning NaN at its start",
        lambda m: PIMA(
            specs(curve=PhysicsModality(expert=Custom(lambda t, a: a * t / 0.0, {"a": (1,)})))
        ).fit(good_data(), epochs=1),
        ValueError,
        "returns non-finite or non-float values",
    ),
    (
        "Custom init naming an unknown parameter",
        lambda m: Custom(lambda t, a: a * t, {"a": (1,)}, init={"A": [1.0]}),
        ValueError,
        r"init names unknown parameters \['A'\]; the parameters are \['a'\]",
    ),
    (
        "Custom init of the wrong shape",
        lambda m: Custom(lambda t, a: a * t, {"a": (1,)}, init={"a": [1.0, 2.0]}),
        ValueError,
        r"init\['a'\] has shape \(2,\); parameter 'a' has shape \(1,\)",
    ),
    (
        "Custom param_shapes with a bare number",
        lambda m: Custom(lambda t, a: a * t, {"a": 1}),
        TypeError,
        r"param_shapes\['a'\] must be a tuple of ints such as \(1,\)",
    ),
    (
        "Custom init outside its prior's support",
        lambda m: Custom(
            lambda t, a: a * t,
            {"a": (1,)},
            priors={"a": pyro.distributions.LogNormal(0.0, 1.0).expand([1]).to_event(1)},
            init={"a": [-1.0]},
        ).bind(2),
        ValueError,
        r"init\['a'\] = \[-1.0\] lies outside the support of its prior \(GreaterThan",
    ),
    (
        "Custom with a zero-sized parameter",
        lambda m: Custom(lambda t, a: t, {"a": (0,)}),
        ValueError,
        "zero size",
    ),
    (
        "checkpoint_dir that is a file",
        lambda m: PIMA(specs(), n_clusters=2).fit(
            good_data(), epochs=1, checkpoint_dir=__file__, progress=False
        ),
        ValueError,
        "is a file, not a directory",
    ),
    (
        "query before fit",
        lambda m: PIMA(specs()).cluster_posterior(good_data()),
        RuntimeError,
        "call fit",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, fitted):
    _, call, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        call(fitted)


def test_numpy_scalars_are_accepted_where_numbers_are_expected():
    model = PIMA(specs(), n_clusters=np.int64(2), latent_dim=np.int32(2))
    model.fit(good_data(), epochs=np.int64(1), lr=np.float32(5e-3), batch_size=np.int64(6),
              progress=False, logger=False)  # fmt: skip
    assert len(model.history.loss) == 1


def test_an_extra_modality_in_the_fit_data_is_warned_about():
    data = MultimodalData({"image": IMAGES, "curve": CURVES, "xrd": CURVES}, grids={"curve": GRID})
    with pytest.warns(UserWarning, match=r"\['xrd'\].*ignored"):
        PIMA(specs(), n_clusters=2).fit(data, epochs=1, progress=False, logger=False)


def test_a_boolean_mask_selects_the_rows_it_marks():
    mask = np.arange(12) % 3 == 0
    picked = good_data(labels=np.arange(12)).subset(mask)
    np.testing.assert_array_equal(picked.labels.numpy(), np.flatnonzero(mask))


def test_table_is_large_enough():
    assert len(CASES) >= 20


def test_load_refuses_wrong_file(tmp_path):
    torch.save([1, 2, 3], tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a pima-pyro model file"):
        PIMA.load(tmp_path / "x.pt")


def test_an_expert_passed_as_the_shape_is_refused_naming_the_keyword():
    from pima_pyro import PIMA, LinearThroughOrigin, PhysicsModality

    with pytest.raises(TypeError, match=r"modality 'curve': shape must be a tuple .*expert="):
        PIMA({"curve": PhysicsModality(LinearThroughOrigin())}, n_clusters=2, latent_dim=2)
