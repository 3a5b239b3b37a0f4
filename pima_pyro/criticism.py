"""Model criticism on top of the ArviZ export: posterior predictive checks per modality and
cluster, PSIS-LOO comparison, and per-cluster physics fits with credible bands."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from pima_pyro.inference.export import to_arviz  # noqa: E402
from pima_pyro.models.experts import PhysicsExpert  # noqa: E402


def assigned_clusters(tree: xr.DataTree) -> xr.DataArray:
    """Most probable cluster of every sample, from the exported ``cluster_probability``
    (``to_datatree(..., latents=True)``)."""
    for group in ("latent_posterior", "posterior"):
        if group in tree.children and "cluster_probability" in tree[group]:
            prob = tree[group]["cluster_probability"].mean(("chain", "draw"))
            return prob.argmax("cluster")
    raise ValueError(
        "the tree has no cluster_probability: export it with to_datatree(..., latents=True)"
    )


def ppc_by_cluster(tree: xr.DataTree, modality: str, interval: float = 0.9) -> xr.Dataset:
    """Posterior predictive check of ``modality`` per assigned cluster.

    Returns, with dim ``cluster``: ``count``; ``observed_mean`` and ``replicated_mean`` (the
    modality's values averaged over the cluster's observed samples and features);
    ``coverage``: the fraction of observed values inside the equal-tailed ``interval`` of their
    own posterior predictive draws (about ``interval`` for a calibrated model).
    """
    observed = tree["observed_data"][modality]
    replicated = tree["posterior_predictive"][modality]
    mask = tree["constant_data"][f"{modality}_observed"]
    alpha = (1 - interval) / 2
    lower = replicated.quantile(alpha, dim=("chain", "draw"))
    upper = replicated.quantile(1 - alpha, dim=("chain", "draw"))
    feature_dims = [d for d in observed.dims if d != "obs"]
    inside = ((observed >= lower) & (observed <= upper)).mean(feature_dims)
    clusters = assigned_clusters(tree)
    k = tree["posterior"].sizes["cluster"]
    rows: dict[str, list[float]] = {
        "count": [],
        "observed_mean": [],
        "replicated_mean": [],
        "coverage": [],
    }
    rep_mean = replicated.mean(("chain", "draw"))
    for c in range(k):
        sel = ((clusters == c) & mask).values
        rows["count"].append(float(sel.sum()))
        if sel.any():
            rows["observed_mean"].append(float(observed.values[sel].mean()))
            rows["replicated_mean"].append(float(rep_mean.values[sel].mean()))
            rows["coverage"].append(float(inside.values[sel].mean()))
        else:
            for key in ("observed_mean", "replicated_mean", "coverage"):
                rows[key].append(np.nan)
    return xr.Dataset(
        {key: (("cluster",), np.array(v)) for key, v in rows.items()},
        coords={"cluster": np.arange(k)},
        attrs={"modality": modality, "interval": interval},
    )


def compare_models(trees: Mapping[str, xr.DataTree], var_name: str) -> Any:
    """``arviz.compare`` (PSIS-LOO) of exported models on one log-likelihood variable."""
    import arviz

    return arviz.compare({name: to_arviz(t) for name, t in trees.items()}, var_name=var_name)


def plot_physics_bands(
    tree: xr.DataTree,
    modality: str,
    expert: PhysicsExpert,
    path: str | os.PathLike[str] | None = None,
    interval: float = 0.9,
) -> plt.Figure:
    """Per-cluster expected curves :math:`f(t; \\theta_c)` with equal-tailed credible bands
    from the posterior draws of theta, over the observed curves coloured by cluster."""
    import torch

    theta = tree["posterior"][f"{modality}_theta"]  # (chain, draw, cluster, param)
    grid = tree["constant_data"][f"{modality}_grid"].values
    draws = theta.values.reshape(-1, *theta.shape[2:])
    with torch.no_grad():
        curves = expert.expected_curve(
            torch.as_tensor(draws, dtype=torch.float64), torch.as_tensor(grid, dtype=torch.float64)
        ).numpy()  # (draws, K, T)
    alpha = (1 - interval) / 2
    lo, mid, hi = np.quantile(curves, [alpha, 0.5, 1 - alpha], axis=0)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    cmap = plt.get_cmap("tab10")
    if "observed_data" in tree.children and modality in tree["observed_data"]:
        observed = tree["observed_data"][modality].values
        if "latent_posterior" in tree.children:
            colours = assigned_clusters(tree).values
        else:
            colours = np.zeros(len(observed), dtype=int)
        for n in range(min(len(observed), 200)):
            ax.plot(grid, observed[n], color=cmap(colours[n] % 10), lw=0.3, alpha=0.3)
    for c in range(mid.shape[0]):
        ax.fill_between(grid, lo[c], hi[c], color=cmap(c % 10), alpha=0.4)
        ax.plot(grid, mid[c], color=cmap(c % 10), lw=1.5)
    ax.set_xlabel(f"{modality} t")
    ax.set_ylabel(modality)
    ax.set_title(f"per-cluster {type(expert).__name__}: median and {int(interval * 100)}% band")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _observed_and_replicated(tree: xr.DataTree, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Observed values (n_obs, F) of the samples where ``modality`` was observed, and their
    replicates (draws, n_obs, F), features flattened."""
    observed = tree["observed_data"][modality].values
    replicated = tree["posterior_predictive"][modality].values
    mask = tree["constant_data"][f"{modality}_observed"].values.astype(bool)
    n = observed.shape[0]
    return (
        observed[mask].reshape(int(mask.sum()), -1),
        replicated.reshape(-1, n, observed[0].size)[:, mask],
    )


def value_ppc(tree: xr.DataTree, modality: str, interval: float = 0.9) -> dict[str, float]:
    """Posterior predictive check of the distribution of a modality's values (e.g. pixels).

    Returns ``pooled_coverage`` (fraction of observed values inside the equal-tailed
    ``interval`` of all replicated values pooled), ``per_value_coverage`` (inside the interval of
    their own replicates; about ``interval`` when calibrated, near 1 when over-dispersed) and
    ``replicated_outside_observed_range`` (fraction of replicates outside [min, max] of the
    observed values: a Gaussian on pixels in [0, 1] puts mass below 0 and above 1).
    """
    observed, replicated = _observed_and_replicated(tree, modality)
    alpha = (1 - interval) / 2
    lo, hi = np.quantile(replicated, [alpha, 1 - alpha])
    lo_each, hi_each = np.quantile(replicated, [alpha, 1 - alpha], axis=0)
    outside = (replicated < observed.min()) | (replicated > observed.max())
    return {
        "pooled_coverage": float(((observed >= lo) & (observed <= hi)).mean()),
        "per_value_coverage": float(((observed >= lo_each) & (observed <= hi_each)).mean()),
        "replicated_outside_observed_range": float(outside.mean()),
    }


def plot_value_ppc(
    tree: xr.DataTree,
    modality: str,
    path: str | os.PathLike[str] | None = None,
    bins: int = 40,
    label: str = "",
) -> plt.Figure:
    """Histograms (densities) of the observed values of ``modality`` and of their replicates."""
    observed, replicated = _observed_and_replicated(tree, modality)
    edges = np.histogram_bin_edges(np.concatenate([observed.ravel(), replicated.ravel()]), bins)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(replicated.ravel(), edges, density=True, alpha=0.5, label="replicated")
    ax.hist(observed.ravel(), edges, density=True, histtype="step", lw=1.5, label="observed")
    ax.set_yscale("log")
    ax.set_xlabel(f"{modality} value")
    ax.set_title(f"posterior predictive check of {modality} values {label}".strip())
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def heldout_log_predictive(tree: xr.DataTree, var_name: str = "total") -> np.ndarray:
    r"""Per-sample log predictive density of held-out data, :math:`\log \frac1S \sum_s
    p(x_n \mid g_s)` over the S draws of the globals in an export of the held-out data: (N,)."""
    import torch

    from pima_pyro.models.mixture import log_mean_exp

    ll = tree["log_likelihood"][var_name].values  # (chain, draw, obs)
    draws = torch.as_tensor(ll.reshape(-1, ll.shape[-1]), dtype=torch.float64)
    return log_mean_exp(draws, dim=0).numpy()


def compare_n_clusters(
    make_model: Any,
    train: Any,
    test: Any,
    n_clusters: list[int],
    num_samples: int = 50,
    **fit_kwargs: Any,
) -> list[dict[str, float]]:
    """Fit ``make_model(K)`` on ``train`` for each K and score it on ``test``.

    Each row: ``n_clusters``, ``heldout_lpd`` (mean of :func:`heldout_log_predictive` on
    ``total``: higher is better; compare it across K with its ``heldout_lpd_se``),
    ``active`` and ``min_weight`` (a K above the data's shows up as surplus weight or inactive
    clusters), and ``elpd_loo`` on ``train`` when the model has Bayesian globals (PSIS-LOO
    needs posterior draws; point estimates would measure in-sample fit). ``fit`` prunes by
    default, so every K above the data's may end with the same active clusters: pass
    ``prune_clusters=False`` to compare the K as given.
    """
    import warnings

    import arviz as az

    rows = []
    for k in n_clusters:
        model = make_model(k)
        model.fit(train, **fit_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the point-estimate note: held-out data here
            tree = model.to_datatree(test, num_samples=num_samples, posterior_predictive=False)
        lpd = heldout_log_predictive(tree)
        mix = model.mixture_parameters()
        row = {
            "n_clusters": float(k),
            "heldout_lpd": float(lpd.mean()),
            "heldout_lpd_se": float(lpd.std(ddof=1) / np.sqrt(lpd.size)),
            "active": float(mix["active"].sum()),
            "min_weight": float(mix["weights"][mix["active"]].min()),
        }
        if model.bayesian_globals:
            train_tree = model.to_datatree(
                train, num_samples=num_samples, posterior_predictive=False
            )
            loo = az.loo(to_arviz(train_tree), var_name="total")
            row["elpd_loo"] = float(getattr(loo, "elpd_loo", getattr(loo, "elpd", np.nan)))
        rows.append(row)
    return rows
