r"""Export to an ``xarray.DataTree`` in the ArviZ schema, and to the installed ArviZ.

Groups (each an ``xarray.Dataset``; ``chain`` and ``draw`` first where they apply):

* ``posterior``: globals ``pi (cluster)``, ``mu (cluster, latent)``, ``sigma (cluster, latent)``,
  per physics modality ``<m>_theta (cluster, <m>_param)`` and ``<m>_noise (cluster)``; per sample
  ``z (obs, latent)`` and ``cluster_probability (obs, cluster)`` = :math:`p(c \mid z, y)`.
  Under point-estimate globals the global draws are copies of the estimate (the group's attrs
  say ``globals = "point_estimate"``); under Bayesian globals they are draws of the mean-field
  guide (``"variational"``); from :mod:`pima_pyro.inference.mcmc` they are NUTS draws (``"mcmc"``).
* ``posterior_predictive``: every modality with its feature dims.
* ``log_likelihood``: per sample and modality, for draw s: for physics modalities the exact
  marginal over the cluster, :math:`\log \sum_c \pi_{c,s}\, \mathcal N(y_{mn};
  f(t; \theta_{mc,s}), s_{mc,s}^2 I)` (y depends on z only through c, so this is also marginal
  over z); for data modalities :math:`\log p(x_{mn} \mid z_s)` given the draw of the local
  latent; ``total`` sums the modalities. Unobserved entries contribute 0. For PSIS-LOO across
  K or experts use a physics variable (``arviz.loo(idata, var_name="curve")``): it depends on
  the global draws only, while the data terms carry the variance of the per-sample z draws.
* ``observed_data``, ``constant_data`` (grids ``<m>_t`` and masks ``<m>_observed``),
  ``sample_stats`` (MCMC only: ``diverging``, ``tree_depth``, ``n_steps``, ``energy``, ``lp``).

Dims: ``chain``, ``draw``, ``obs``, ``cluster``, ``latent``, ``<m>_param``, and per modality
``<m>_t`` (physics, coordinate = the grid) or ``<m>_dim_0``, ``<m>_dim_1``, ... (data).
"""

from __future__ import annotations

import datetime
import importlib.metadata
from typing import Any

import numpy as np
import pyro
import torch
import xarray as xr

from pima_pyro.data import MultimodalData
from pima_pyro.inference.mcmc import MCMCResult
from pima_pyro.models.experts import gaussian_curve_log_likelihood
from pima_pyro.models.guide import encode
from pima_pyro.models.module import PIMAModule

ARVIZ_GROUPS = (
    "posterior",
    "posterior_predictive",
    "log_likelihood",
    "sample_stats",
    "observed_data",
    "constant_data",
)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _attrs(method: str, globals_kind: str) -> dict[str, str]:
    return {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "inference_library": "pyro",
        "inference_library_version": str(pyro.__version__),
        "inference_method": method,
        "globals": globals_kind,
        "pima_pyro_version": _version("pima-pyro"),
        "torch_version": str(torch.__version__),
        "arviz_version": _version("arviz"),
    }


def feature_dims(net: PIMAModule, name: str) -> list[str]:
    """Names of the feature dims of modality ``name``."""
    if net.is_physics(name):
        return [f"{name}_t"]
    shape = net.modalities[name].spec.shape or ()
    return [f"{name}_dim_{i}" for i in range(len(shape))]


def _feature_coords(net: PIMAModule, name: str) -> dict[str, np.ndarray]:
    if net.is_physics(name):
        return {f"{name}_t": net.modalities[name].grid.detach().cpu().numpy()}
    shape = net.modalities[name].spec.shape or ()
    return {f"{name}_dim_{i}": np.arange(s) for i, s in enumerate(shape)}


@torch.no_grad()
def _draw_globals(net: PIMAModule, num_samples: int) -> tuple[dict[str, torch.Tensor], str]:
    """Globals for each draw: (S, ...) tensors; the kind of draw."""
    if net.bayesian_globals:
        sites = dict(net.global_guide_sites())
        out = {site: q.sample((num_samples,)) for site, q in sites.items()}
        kind = "variational"
    else:
        out = {"pi": torch.softmax(net.mixture.logits, -1).expand(num_samples, -1)}
        for name in net.physics_names:
            expert = net.modalities[name].expert
            out[f"theta_{name}"] = expert.theta.expand(num_samples, -1, -1)
            out[f"noise_{name}"] = expert.noise_scale.expand(num_samples, -1)
        kind = "point_estimate"
    return out, kind


@torch.no_grad()
def to_datatree(
    net: PIMAModule,
    data: MultimodalData,
    num_samples: int = 500,
    seed: int = 0,
    posterior_predictive: bool = True,
) -> xr.DataTree:
    """Draw ``num_samples`` times from the fitted variational posterior and build the tree."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"to_arviz: num_samples must be an int >= 1, got {num_samples!r}")
    device = net.mixture.loc.device
    dtype = net.mixture.loc.dtype
    batch = data.to_batch(device=device, dtype=dtype)
    n, k, d = data.n_samples, net.n_clusters, net.latent_dim
    names = [m for m in net.modality_names if m in data.values]
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        draws, globals_kind = _draw_globals(net, num_samples)
        loc, log_var = encode(net, batch.values, batch.observed)
        z = loc + torch.exp(0.5 * log_var) * torch.randn(
            num_samples, n, d, dtype=dtype, device=device
        )
        mix = net.mixture
        log_pi = torch.log(draws["pi"].clamp_min(torch.finfo(dtype).tiny))  # (S, K)
        log_pz = mix.component_log_prob(z, torch.zeros(k, dtype=dtype, device=device))  # (S,N,K)
        log_pc_z = torch.log_softmax(log_pi[:, None, :] + log_pz, -1)  # p(c | z_s)
        log_lik: dict[str, torch.Tensor] = {}
        predictive: dict[str, torch.Tensor] = {}
        phys_ll_c = torch.zeros(num_samples, n, k, dtype=dtype, device=device)
        for name in names:
            module = net.modalities[name]
            observed = batch.observed[name]
            if net.is_physics(name):
                theta = draws[f"theta_{name}"]  # (S, K, P)
                means = module.expert.expected_curve(theta, module.grid)  # (S, K, T)
                scale = draws[f"noise_{name}"]  # (S, K)
                ll_c = gaussian_curve_log_likelihood(batch.values[name], means, scale)  # (S, N, K)
                ll_c = ll_c * observed[None, :, None]
                phys_ll_c = phys_ll_c + ll_c
                # y depends on c only: log sum_c pi_c p(y | c) is its exact marginal likelihood
                log_lik[name] = torch.logsumexp(log_pi[:, None, :] + ll_c, -1) * observed
            else:
                likelihood = module.likelihood(z)
                log_lik[name] = likelihood.log_prob(batch.values[name]) * observed
                if posterior_predictive:
                    predictive[name] = likelihood.sample()
        cluster_prob = torch.softmax(log_pc_z + phys_ll_c, -1)  # p(c | z_s, y)
        if posterior_predictive:
            flat = cluster_prob.reshape(-1, k)
            c = torch.multinomial(flat, 1).reshape(num_samples, n)
            for name in names:
                if not net.is_physics(name):
                    continue
                module = net.modalities[name]
                means = module.expert.expected_curve(draws[f"theta_{name}"], module.grid)
                chosen = torch.gather(
                    means, 1, c[..., None].expand(-1, -1, means.shape[-1])
                )  # (S, N, T)
                noise = torch.gather(draws[f"noise_{name}"], 1, c)
                predictive[name] = chosen + noise[..., None] * torch.randn_like(chosen)

    def cd(x: torch.Tensor) -> np.ndarray:  # (S, ...) -> (1, S, ...)
        return x.detach().cpu().numpy()[None]

    coords: dict[str, Any] = {
        "chain": [0],
        "draw": np.arange(num_samples),
        "obs": np.arange(n),
        "cluster": np.arange(k),
        "latent": np.arange(d),
    }
    posterior_vars = {
        "pi": (("chain", "draw", "cluster"), cd(draws["pi"])),
        "mu": (("chain", "draw", "cluster", "latent"), cd(mix.loc.expand(num_samples, -1, -1))),
        "sigma": (
            ("chain", "draw", "cluster", "latent"),
            cd(mix.scale.expand(num_samples, -1, -1)),
        ),
        "z": (("chain", "draw", "obs", "latent"), cd(z)),
        "cluster_probability": (("chain", "draw", "obs", "cluster"), cd(cluster_prob)),
    }
    for name in net.physics_names:
        expert = net.modalities[name].expert
        coords[f"{name}_param"] = np.array(expert.param_names, dtype=object)
        posterior_vars[f"{name}_theta"] = (
            ("chain", "draw", "cluster", f"{name}_param"),
            cd(draws[f"theta_{name}"]),
        )
        posterior_vars[f"{name}_noise"] = (("chain", "draw", "cluster"), cd(draws[f"noise_{name}"]))
    for name in names:
        coords.update(_feature_coords(net, name))
    method = "SVI (TraceEnum_ELBO, product-of-experts guide)"
    groups: dict[str, xr.Dataset] = {}
    groups["posterior"] = xr.Dataset(
        posterior_vars, coords=coords, attrs=_attrs(method, globals_kind)
    )
    if posterior_predictive:
        groups["posterior_predictive"] = xr.Dataset(
            {
                name: (("chain", "draw", "obs", *feature_dims(net, name)), cd(v))
                for name, v in predictive.items()
            },
            coords=coords,
            attrs=_attrs(method, globals_kind),
        )
    ll_vars = {name: (("chain", "draw", "obs"), cd(v)) for name, v in log_lik.items()}
    ll_vars["total"] = (("chain", "draw", "obs"), cd(sum(log_lik.values())))
    groups["log_likelihood"] = xr.Dataset(
        ll_vars, coords=coords, attrs=_attrs(method, globals_kind)
    )
    groups["observed_data"] = _observed_group(net, data, names, coords)
    groups["constant_data"] = _constant_group(net, data, names, coords)
    return _tree(groups)


def _observed_group(net, data, names, coords) -> xr.Dataset:
    return xr.Dataset(
        {name: (("obs", *feature_dims(net, name)), data.values[name].numpy()) for name in names},
        coords={k: v for k, v in coords.items() if k not in ("chain", "draw")},
        attrs={"note": "unobserved entries are zeros; see constant_data <name>_observed"},
    )


def _constant_group(net, data, names, coords) -> xr.Dataset:
    variables = {f"{n}_observed": (("obs",), data.masks[n].numpy()) for n in names}
    for name in names:
        if net.is_physics(name):
            variables[f"{name}_grid"] = (
                (f"{name}_t",),
                net.modalities[name].grid.detach().cpu().numpy(),
            )
    return xr.Dataset(
        variables, coords={k: v for k, v in coords.items() if k not in ("chain", "draw")}
    )


def _tree(groups: dict[str, xr.Dataset]) -> xr.DataTree:
    tree = xr.DataTree.from_dict(groups)
    tree.attrs = {"schema": "arviz", "groups": ",".join(groups)}
    return tree


def mcmc_to_datatree(result: MCMCResult, curves: dict[str, np.ndarray] | None = None, grids=None):
    """NUTS draws as a tree: ``posterior`` (pi, <m>_theta, <m>_noise), ``sample_stats``, and
    ``observed_data``/``constant_data`` when ``curves``/``grids`` are given."""
    chains, draws = result.samples["pi"].shape[:2]
    k = result.samples["pi"].shape[-1]
    coords: dict[str, Any] = {
        "chain": np.arange(chains),
        "draw": np.arange(draws),
        "cluster": np.arange(k),
    }
    variables = {"pi": (("chain", "draw", "cluster"), result.samples["pi"])}
    for name, params in result.param_names.items():
        coords[f"{name}_param"] = np.array(params, dtype=object)
        variables[f"{name}_theta"] = (
            ("chain", "draw", "cluster", f"{name}_param"),
            result.samples[f"theta_{name}"],
        )
        variables[f"{name}_noise"] = (("chain", "draw", "cluster"), result.samples[f"noise_{name}"])
    method = f"NUTS (pyro), c enumerated, ordered by {result.order_by}"
    groups = {
        "posterior": xr.Dataset(variables, coords=coords, attrs=_attrs(method, "mcmc")),
        "sample_stats": xr.Dataset(
            {k2: (("chain", "draw"), v) for k2, v in result.sample_stats.items()},
            coords={"chain": coords["chain"], "draw": coords["draw"]},
            attrs=_attrs(method, "mcmc"),
        ),
    }
    if curves is not None:
        n = next(iter(curves.values())).shape[0]
        groups["observed_data"] = xr.Dataset(
            {m: (("obs", f"{m}_t"), np.asarray(v)) for m, v in curves.items()},
            coords={"obs": np.arange(n), **{f"{m}_t": np.asarray(grids[m]) for m in curves}},
        )
    return _tree(groups)


def to_arviz(tree: xr.DataTree) -> Any:
    """What the installed ArviZ uses: the DataTree itself for ArviZ >= 1.0, else an
    ``arviz.InferenceData`` built from it (ArviZ 0.x)."""
    import arviz

    major = int(str(arviz.__version__).split(".")[0])
    if major >= 1:
        return tree
    return arviz.InferenceData.from_datatree(tree)
