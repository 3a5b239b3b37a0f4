"""ArviZ export: groups, dims and coords; NetCDF round trip; log-likelihood math; MCMC stats."""

import os
import warnings

import arviz as az
import numpy as np
import pytest
import xarray as xr

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.export import ARVIZ_GROUPS, EXTRA_GROUPS, mcmc_to_datatree
from pima_pyro.models.experts import LinearThroughOrigin

DRAW_GROUPS = (
    "posterior",
    "posterior_predictive",
    "log_likelihood",
    "sample_stats",
    "latent_posterior",
)


@pytest.fixture(scope="module")
def data():
    return digits_affine(seed=0).subset(np.arange(240))


@pytest.fixture(scope="module")
def point_model(data):
    model = PIMA(affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3)
    model.fit(data, epochs=5, seed=0, progress=False)
    return model


@pytest.fixture(scope="module")
def bayes_model(data):
    model = PIMA(
        affine_modalities(hidden=(32,)), n_clusters=10, latent_dim=3, bayesian_globals=True
    )
    model.fit(data, epochs=5, seed=0, progress=False)
    return model


def check_arviz_schema(tree: xr.DataTree) -> None:
    """The ArviZ (1.x DataTree / 0.x InferenceData) conventions this package promises."""
    assert set(tree.children) <= set(ARVIZ_GROUPS) | set(EXTRA_GROUPS)
    for group, node in tree.children.items():
        ds = node.to_dataset()
        for name, var in ds.data_vars.items():
            if group in DRAW_GROUPS:
                assert var.dims[:2] == ("chain", "draw"), (group, name, var.dims)
            else:
                assert "chain" not in var.dims and "draw" not in var.dims, (group, name)
            for dim in var.dims:
                assert dim in ds.coords, f"{group}/{name}: dim {dim} has no coordinate"


def test_groups_dims_and_coords(point_model, data):
    tree = point_model.to_datatree(data, num_samples=20, ppc_samples=5, latents=True)
    check_arviz_schema(tree)
    assert set(tree.children) == {
        "posterior",
        "point_estimates",
        "latent_posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }
    post = tree["posterior"].to_dataset()
    assert post["pi"].dims == ("chain", "draw", "cluster")
    assert set(post.data_vars) == {"pi", "curve_theta", "curve_noise"}  # globals only
    latent = tree["latent_posterior"].to_dataset()
    assert latent["z"].dims == ("chain", "draw", "obs", "latent")
    assert latent["cluster_probability"].dims == ("chain", "draw", "obs", "cluster")
    np.testing.assert_allclose(latent["cluster_probability"].sum("cluster"), 1.0, rtol=1e-5)
    point = tree["point_estimates"].to_dataset()
    assert point["mu"].dims == ("cluster", "latent")
    np.testing.assert_allclose(point["mu"].values, point_model.mixture_parameters()["loc"])
    assert post["curve_theta"].dims == ("chain", "draw", "cluster", "curve_param")
    assert list(post["curve_param"].values) == ["slope"]
    assert post.attrs["globals"] == "point_estimate"
    assert post.attrs["inference_library"] == "pyro"
    pp = tree["posterior_predictive"].to_dataset()
    assert pp.sizes["draw"] == 5
    assert pp["image"].dims == ("chain", "draw", "obs", "image_dim_0", "image_dim_1")
    assert pp["curve"].dims == ("chain", "draw", "obs", "curve_t")
    np.testing.assert_allclose(pp["curve_t"].values, data.grids["curve"].numpy())
    obs = tree["observed_data"].to_dataset()
    np.testing.assert_array_equal(obs["curve"].values, data.values["curve"].numpy())
    const = tree["constant_data"].to_dataset()
    assert const["image_observed"].dtype == bool


def test_log_likelihood_is_log_sum_over_clusters(point_model, data):
    tree = point_model.to_datatree(data, num_samples=5, log_likelihood_terms=True)
    ll = tree["log_likelihood"].to_dataset()
    params = point_model.physics_parameters()["curve"]
    pi = point_model.mixture_parameters()["weights"]
    t = data.grids["curve"].numpy().astype(np.float64)
    y = data.values["curve"].numpy().astype(np.float64)
    for n in (0, 17, 101):
        means = params["theta"][:, :1] * t  # (K, T)
        s = params["noise_scale"][:, None]
        log_terms = np.log(pi) + (
            -0.5 * ((y[n] - means) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
        ).sum(1)
        expected = np.logaddexp.reduce(log_terms)
        np.testing.assert_allclose(ll["curve"].values[0, :, n], expected, rtol=1e-5)


def test_netcdf_round_trip_is_exact(point_model, data, tmp_path):
    tree = point_model.to_datatree(data, num_samples=10)
    path = tmp_path / "export.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    back = xr.open_datatree(path, engine="h5netcdf")
    for group in tree.children:
        xr.testing.assert_identical(back[group].to_dataset(), tree[group].to_dataset())
    idata = point_model.to_arviz(data, num_samples=10)
    assert isinstance(idata, az.InferenceData)  # ArviZ 0.x here
    idata.to_netcdf(str(tmp_path / "idata.nc"))
    again = az.from_netcdf(str(tmp_path / "idata.nc"))
    for group in idata.groups():
        xr.testing.assert_equal(getattr(again, group), getattr(idata, group))


def test_bayesian_globals_give_real_draws_and_loo_runs(bayes_model, point_model, data):
    tree = bayes_model.to_datatree(data, num_samples=50, posterior_predictive=False)
    post = tree["posterior"].to_dataset()
    assert post.attrs["globals"] == "variational"
    assert float(post["curve_theta"].std("draw").min()) > 0
    assert float(post["pi"].sum("cluster").min()) == pytest.approx(1.0, rel=1e-5)
    point = point_model.to_datatree(data, num_samples=5)["posterior"].to_dataset()
    assert float(point["curve_theta"].std("draw").max()) == pytest.approx(0.0, abs=1e-5)
    idata = bayes_model.to_arviz(
        data, num_samples=50, posterior_predictive=False, log_likelihood_terms=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loo = az.loo(idata, var_name="curve")
    assert np.isfinite(loo.elpd_loo)
    assert not [w for w in caught if "group" in str(w.message).lower()]


def test_mcmc_export_has_sample_stats_log_likelihood_and_relabelled_clusters(point_model, data):
    result = point_model.sample_physics_posterior(
        data, num_samples=20, warmup_steps=20, num_chains=2, seed=0
    )
    tree = mcmc_to_datatree(result, log_likelihood_terms=True)
    check_arviz_schema(tree)
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "constant_data"} <= set(
        tree.children
    )
    stats = tree["sample_stats"].to_dataset()
    for name in ("diverging", "tree_depth", "step_size", "n_steps", "lp"):
        assert stats[name].dims == ("chain", "draw") and stats[name].shape == (2, 20)
    if os.cpu_count() - 1 < 2:  # chains ran in this process: the hook saw every draw
        assert np.isfinite(stats["tree_depth"].values).all()
        assert (stats["n_steps"].values >= 1).all()
    slopes = tree["posterior"]["curve_theta"].values[..., 0]
    assert np.all(np.diff(slopes, axis=-1) >= 0)  # relabelled: sorted in every draw
    ll = tree["log_likelihood"].to_dataset()
    assert ll["curve"].dims == ("chain", "draw", "obs")
    np.testing.assert_array_equal(
        tree["observed_data"]["curve"].values, data.values["curve"].numpy()
    )
    summary = az.summary(az.InferenceData.from_datatree(tree), var_names=["curve_theta"])
    assert len(summary) == 10


def test_ppc_by_cluster_and_physics_bands(point_model, data, tmp_path):
    from pima_pyro.criticism import plot_physics_bands, ppc_by_cluster

    tree = point_model.to_datatree(data, num_samples=100, ppc_samples=100, latents=True)
    ppc = ppc_by_cluster(tree, "curve")
    assert int(ppc["count"].sum()) == data.n_samples
    populated = ppc["count"] > 0
    # the model generated these curves with the same noise level: coverage near the nominal 90%
    coverage = float((ppc["coverage"] * ppc["count"]).sum() / ppc["count"].sum())
    assert 0.8 <= coverage <= 0.97
    np.testing.assert_allclose(
        ppc["observed_mean"].where(populated, drop=True),
        ppc["replicated_mean"].where(populated, drop=True),
        atol=0.3,
    )
    fig = plot_physics_bands(tree, "curve", LinearThroughOrigin(), tmp_path / "bands.png")
    assert (tmp_path / "bands.png").stat().st_size > 0
    assert len(fig.axes) == 1


def test_point_estimate_export_warns_that_loo_is_in_sample(point_model, data):
    with pytest.warns(UserWarning, match="in-sample"):
        tree = point_model.to_datatree(data, num_samples=3, posterior_predictive=False)
    ll = tree["log_likelihood"].to_dataset()
    assert "in-sample" in ll.attrs["warning"]
    assert ll.attrs["importance_draws"] == 64
    assert ll.attrs["curve_mc_se_max"] == 0.0  # physics terms are exact
    assert 0 < ll.attrs["total_mc_se_mean"] < 1.0


def test_bayesian_export_log_likelihood_varies_with_the_global_draws(bayes_model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no in-sample warning here
        tree = bayes_model.to_datatree(
            data, num_samples=40, posterior_predictive=False, log_likelihood_terms=True
        )
    ll = tree["log_likelihood"].to_dataset()
    assert "warning" not in ll.attrs
    assert float(ll["curve"].std("draw").min()) > 0
    assert float(ll["total"].std("draw").min()) > 0


def test_rows_with_nothing_observed_draw_z_from_the_mixture_prior(point_model, data):
    masks = {name: np.arange(data.n_samples) >= 3 for name in data.values}
    from pima_pyro.data import MultimodalData

    holes = MultimodalData(
        {k: v.numpy() for k, v in data.values.items()},
        grids={k: v.numpy() for k, v in data.grids.items()},
        masks=masks,
    )
    with pytest.warns(UserWarning, match="in-sample"):
        tree = point_model.to_datatree(
            holes, num_samples=2000, posterior_predictive=False, latents=True
        )
    z = tree["latent_posterior"]["z"].values[0, :, :3]  # (draws, 3 empty rows, latent)
    mix = point_model.mixture_parameters()
    np.testing.assert_allclose(
        z.mean(0), np.broadcast_to(mix["weights"] @ mix["loc"], (3, 3)), atol=0.15
    )
    assert float(tree["log_likelihood"]["total"].values[0, :, :3].max()) == 0.0


def test_default_export_summarises_the_globals_and_loo_runs_without_var_name(bayes_model, data):
    idata = bayes_model.to_arviz(data, num_samples=40)
    summary = az.summary(idata)
    k, params = bayes_model.n_clusters, len(bayes_model.specs["curve"].expert.param_names)
    assert len(summary) == k + k * params + k  # pi, curve_theta, curve_noise: nothing per sample
    assert list(idata.log_likelihood.data_vars) == ["total"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(az.loo(idata).elpd_loo)
    assert idata.posterior_predictive.sizes["draw"] == 40  # fewer draws than ppc_samples=50
    result = bayes_model.sample_physics_posterior(
        data, num_samples=10, warmup_steps=10, num_chains=1, seed=0
    )
    mcmc = result.to_arviz()
    assert "observed_data" in mcmc.groups() and list(mcmc.log_likelihood.data_vars) == ["total"]


def test_ppc_options_thin_and_choose_modalities(point_model, data):
    tree = point_model.to_datatree(data, num_samples=30, ppc_samples=7, ppc_modalities=["curve"])
    pp = tree["posterior_predictive"].to_dataset()
    assert list(pp.data_vars) == ["curve"] and pp.sizes["draw"] == 7
    with pytest.raises(ValueError, match="ppc_modalities"):
        point_model.to_datatree(data, num_samples=5, ppc_modalities=["xrd"])
    with pytest.raises(ValueError, match="ppc_samples"):
        point_model.to_datatree(data, num_samples=5, ppc_samples=-1)
