"""The analyst's workflow: lab data in (xarray, arrays, NPZ), `pima-pyro fit CONFIG.toml`,
`predict` and `inspect`, and an export that ArviZ summarises and LOOs without arguments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import arviz as az
import numpy as np
import pytest
import xarray as xr

from pima_pyro import MultimodalData
from pima_pyro.cli import main
from pima_pyro.config import load_config, modality_spec
from pima_pyro.examples import EXAMPLES
from pima_pyro.io import from_arrays, from_npz, from_xarray, to_xarray


def _lab_data() -> MultimodalData:
    rng = np.random.default_rng(0)
    masks = {"image": rng.random(30) < 0.8, "curve": rng.random(30) < 0.6}
    masks["image"] |= ~masks["curve"]
    return MultimodalData(
        {
            "image": rng.random((30, 4, 5)),
            "curve": rng.normal(size=(30, 7)),
            "h": rng.normal(size=30),
        },
        masks=masks,
        grids={"curve": np.linspace(0, 1, 7) ** 2},
        labels=rng.integers(0, 3, 30),
    )


def _assert_same(a: MultimodalData, b: MultimodalData) -> None:
    assert set(a.values) == set(b.values) and set(a.grids) == set(b.grids)
    for name in a.values:
        np.testing.assert_array_equal(a.masks[name].numpy(), b.masks[name].numpy())
        np.testing.assert_array_equal(a.values[name].numpy(), b.values[name].numpy())
    for name in a.grids:
        np.testing.assert_array_equal(a.grids[name].numpy(), b.grids[name].numpy())
    np.testing.assert_array_equal(a.labels.numpy(), b.labels.numpy())


@pytest.mark.parametrize("store", ["netcdf", "zarr"])
def test_xarray_round_trip_keeps_values_masks_grids_and_labels_exactly(tmp_path, store):
    data = _lab_data()
    dataset = to_xarray(data)
    assert bool(np.isnan(dataset["curve"].values[~data.masks["curve"].numpy()]).all())
    if store == "netcdf":
        dataset.to_netcdf(tmp_path / "d.nc", engine="h5netcdf")
        back = xr.open_dataset(tmp_path / "d.nc").load()
    else:
        pytest.importorskip("zarr")
        dataset.to_zarr(tmp_path / "d.zarr")
        back = xr.open_zarr(tmp_path / "d.zarr").load()
    _assert_same(data, from_xarray(back))
    _assert_same(data, MultimodalData.from_xarray(data.to_xarray()))


def test_a_lab_file_without_masks_takes_them_from_nan():
    curves = np.ones((4, 3))
    curves[1, 2] = np.nan
    dataset = xr.Dataset(
        {"curve": (("s", "t"), curves), "x": (("s",), [1.0, np.nan, 2.0, 3.0])},
        coords={"t": [0.0, 0.5, 1.0]},
    )
    data = from_xarray(dataset, sample_dim="s", physics={"curve": "t"})
    assert data.masks["curve"].tolist() == [True, False, True, True]
    assert data.masks["x"].tolist() == [True, False, True, True]
    np.testing.assert_array_equal(data.grids["curve"].numpy(), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="grid coordinate 'tt'"):
        from_xarray(dataset, sample_dim="s", physics={"curve": "tt"})


def test_arrays_and_npz_in(tmp_path):
    columns = {"a": [1.0, 2.0, np.nan], "b": [0.0, 1.0, 2.0], "c": [5.0, 6.0, 7.0]}
    data = from_arrays(columns, {"ab": ["a", "b"], "c": ["c"]})
    assert data.masks["ab"].tolist() == [True, True, False]
    np.testing.assert_array_equal(data.values["ab"].numpy()[:2], [[1.0, 0.0], [2.0, 1.0]])
    np.savez(tmp_path / "d.npz", curve=np.ones((3, 2)), curve_t=[0.0, 1.0], label=[0, 1, 1])
    npz = from_npz(tmp_path / "d.npz", physics=["curve"])
    assert npz.labels.tolist() == [0, 1, 1] and npz.grids["curve"].tolist() == [0.0, 1.0]


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\npath = "x.nc"\n[modalities.a]\nlikelihood = "gaussian"\nsale = 1\n')
    with pytest.raises(ValueError, match=r"\[modalities.a\] has unknown key\(s\) \['sale'\]"):
        load_config(path)
    with pytest.raises(ValueError, match=r"\[modalities.a\] likelihood must be"):
        modality_spec("a", {"likelihood": "poisson"})
    with pytest.raises(ValueError, match=r"\[modalities.a\] scale must be"):
        modality_spec("a", {"likelihood": "gaussian", "scale": -1})
    with pytest.raises(ValueError, match=r"\[modalities.c\] expert must be one of"):
        modality_spec("c", {"likelihood": "physics", "expert": "Spline"})


def test_the_shipped_example_fits_predicts_and_exports_for_arviz(tmp_path, capsys):
    """A new user's run: a lab NetCDF (images + curve + scalar, some missing) and a TOML
    config through `pima-pyro fit` and `pima-pyro predict`."""
    for name in ("lab.toml", "lab.nc"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    config = (tmp_path / "lab.toml").read_text().replace("epochs = 60", "epochs = 15")
    (tmp_path / "lab.toml").write_text(config)
    assert main(["fit", str(tmp_path / "lab.toml"), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "pima_out"
    assert {p.name for p in out.iterdir()} >= {"model.pt", "arviz.nc", "loss.png", "metrics.json"}
    assert sum(metrics["cluster_sizes"]) == 300
    idata = az.from_netcdf(str(out / "arviz.nc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(az.loo(idata).elpd_loo)  # no var_name: one joint log-likelihood
    assert len(az.summary(idata, kind="stats")) == 4 + 4 * 3 + 4  # pi, theta (3 per cluster), noise
    argv = ["predict", str(out / "model.pt"), str(tmp_path / "lab.nc"), "--given", "image",
            "--target", "curve", "--out", str(tmp_path / "pred.nc")]  # fmt: skip
    assert main(argv) == 0
    pred = xr.open_dataset(tmp_path / "pred.nc").load()
    assert pred["curve_mean"].shape == (300, 20)
    assert bool((pred["curve_lower"] <= pred["curve_upper"]).all())
    assert main(["inspect", str(out / "model.pt")]) == 0
    inspected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert inspected["specs"]["curve"]["expert"]["class"] == "ExponentialDecay"


def test_importing_the_plotting_modules_keeps_the_users_backend():
    code = (
        "import matplotlib; matplotlib.use('svg'); import pima_pyro.plots, pima_pyro.criticism;"
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
