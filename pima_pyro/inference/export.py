r"""Export to an ``xarray.DataTree`` in the ArviZ schema, and to the installed ArviZ.

Groups (each an ``xarray.Dataset``; ``chain`` and ``draw`` first where they apply):

* ``posterior``: globals ``pi (cluster)``, ``mu (cluster, latent)``, ``sigma (cluster, latent)``,
  per physics modality ``<m>_theta (cluster, <m>_param)`` and ``<m>_noise (cluster)``; per sample
  ``z (obs, latent)`` and ``cluster_probability (obs, cluster)`` = :math:`p(c \mid z, y)`.
  Under point-estimate globals the global draws are copies of the estimate (the group's attrs
  say ``globals = "point_estimate"``); under Bayesian globals they are draws of the mean-field
  guide (``"variational"``); from :mod:`pima_pyro.inference.mcmc` they are NUTS draws (``"mcmc"``).
* ``posterior_predictive``: every modality with its feature dims.
* ``log_likelihood``: for observation n and draw s of the globals, ``<m>`` =
  :math:`\log p(x_{mn} \mid g_s)` and ``total`` = :math:`\log p(\text{all observed modalities
  of } n \mid g_s)`, both marginal over c (exactly) and z: physics-only terms are exact,
  :math:`\log \sum_c \pi_{c,s} \mathcal N(y_{mn}; f(t; \theta_{mc,s}), s_{mc,s}^2 I)`; terms
  with a data modality are importance-sampled with the encoder as proposal
  (:mod:`pima_pyro.inference.marginal`; ``num_importance`` draws; the Monte-Carlo standard
  errors are in the attrs). Unobserved entries contribute 0. Under point-estimate globals the
  attrs (and a warning) say that PSIS-LOO on these draws measures in-sample fit.
* ``observed_data``, ``constant_data`` (grids ``<m>_t`` and masks ``<m>_observed``),
  ``sample_stats`` (MCMC only: ``diverging``, ``step_size``, ``n_steps``, ``tree_depth``,
  ``lp``).

Dims: ``chain``, ``draw``, ``obs``, ``cluster``, ``latent``, ``<m>_param``, and per modality
``<m>_t`` (physics, coordinate = the grid) or ``<m>_dim_0``, ``<m>_dim_1``, ... (data).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
import xarray as xr
from pyro.ops.indexing import Vindex

from pima_pyro.data import Batch, MultimodalData
from pima_pyro.inference.marginal import physics_cluster_terms, pointwise_log_likelihood
from pima_pyro.inference.mcmc import MCMCResult
from pima_pyro.inference.posterior import sample_mixture_prior
from pima_pyro.models.experts import curve_likelihood
from pima_pyro.models.guide import encode, latent_distribution
from pima_pyro.models.mixture import cluster_log_posterior_from_joint, log_weights_of
from pima_pyro.models.module import PIMAModule

ARVIZ_GROUPS = (
    "posterior",
    "posterior_predictive",
    "log_likelihood",
    "sample_stats",
    "observed_data",
    "constant_data",
)
#: Groups of this package beside ArviZ's: per-sample draws kept out of ``posterior`` (so that
#: ``az.summary`` reports the globals) and point estimates exported once, without draw dims.
EXTRA_GROUPS = ("latent_posterior", "point_estimates")


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
        draws = {site: q.sample((num_samples,)) for site, q in sites.items()}
        return net.with_fixed_globals(draws, (num_samples,)), "variational"
    point = net.point_globals()
    out = {site: v.expand(num_samples, *v.shape) for site, v in point.items()}
    return out, "point_estimate"


#: What the attrs of ``log_likelihood`` say under point-estimate globals.
IN_SAMPLE_NOTE = (
    "globals are point estimates repeated on every draw: PSIS-LOO and WAIC on these draws "
    "measure in-sample fit (p_loo near 0), not out-of-sample predictive accuracy; fit with "
    "bayesian_globals=True for posterior draws of pi, theta and noise"
)


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`to_datatree` exports beyond the globals and the joint log-likelihood.

    Attributes:
        ppc_samples: draws of the posterior predictive (the first ``ppc_samples`` of the
            ``num_samples`` draws, all of them when fewer; 0 or ``posterior_predictive=False``
            for none).
        ppc_modalities: the modalities replicated (default: all).
        latents: export the per-sample ``z`` and ``cluster_probability`` draws, in their own
            group ``latent_posterior`` (so that ``az.summary`` reports the globals only).
        log_likelihood_terms: export one log-likelihood variable per modality beside the joint
            ``total`` (then ``az.loo`` needs ``var_name``).
    """

    ppc_samples: int = 50
    ppc_modalities: tuple[str, ...] | None = None
    latents: bool = False
    log_likelihood_terms: bool = False


@torch.no_grad()
def to_datatree(
    net: PIMAModule,
    data: MultimodalData,
    num_samples: int = 500,
    seed: int = 0,
    posterior_predictive: bool = True,
    num_importance: int = 64,
    options: ExportOptions | None = None,
) -> xr.DataTree:
    """Draw ``num_samples`` times from the fitted posterior of the globals and build the tree.

    ``num_importance`` is the number J of encoder draws per sample in the importance-sampled
    log-likelihoods (:mod:`pima_pyro.inference.marginal`). Under point-estimate globals this
    warns that LOO on the export measures in-sample fit.
    """
    options = options or ExportOptions()
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"to_arviz: num_samples must be an int >= 1, got {num_samples!r}")
    device = net.mixture.loc.device
    batch = data.to_batch(device=device, dtype=net.mixture.loc.dtype)
    names = [m for m in net.modality_names if m in data.values]
    ppc_names = _ppc_names(names, options, posterior_predictive, num_samples)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        draws, globals_kind = _draw_globals(net, num_samples)
        z, cluster_prob = _local_draws(net, batch, names, draws)
        log_lik, log_lik_se = pointwise_log_likelihood(net, batch, draws, names, num_importance)
        predictive = _posterior_predictive(net, batch, ppc_names, draws, z, cluster_prob)
    if globals_kind == "point_estimate":
        warnings.warn("to_arviz: " + IN_SAMPLE_NOTE, UserWarning, stacklevel=3)
    if not options.log_likelihood_terms:
        log_lik = {"total": log_lik["total"]}
    coords = _coords(net, data, names, num_samples)
    attrs = _attrs("SVI (TraceEnum_ELBO, product-of-experts guide)", globals_kind)
    groups: dict[str, xr.Dataset] = {
        "posterior": xr.Dataset(_posterior_vars(net, draws), coords=coords, attrs=attrs),
        "point_estimates": _point_estimates_group(net, coords),
    }
    if options.latents:
        groups["latent_posterior"] = _latent_group(z, cluster_prob, coords, attrs)
    if ppc_names:
        groups["posterior_predictive"] = _predictive_group(
            net, predictive, coords, min(options.ppc_samples, num_samples), attrs
        )
    groups["log_likelihood"] = _log_likelihood_group(
        log_lik, log_lik_se, coords, num_importance, attrs
    )
    groups["observed_data"] = _observed_group(net, data, names, coords)
    groups["constant_data"] = _constant_group(net, data, names, coords)
    return _tree(groups)


def _ppc_names(
    names: list[str], options: ExportOptions, posterior_predictive: bool, num_samples: int
) -> list[str]:
    if not isinstance(options.ppc_samples, int) or options.ppc_samples < 0:
        raise ValueError(f"to_arviz: ppc_samples must be an int >= 0, got {options.ppc_samples!r}")
    wanted = list(options.ppc_modalities) if options.ppc_modalities is not None else names
    unknown = [m for m in wanted if m not in names]
    if unknown:
        raise ValueError(f"to_arviz: ppc_modalities {unknown} are not in the data ({names})")
    return wanted if posterior_predictive and options.ppc_samples > 0 else []


def _point_estimates_group(net: PIMAModule, coords: dict) -> xr.Dataset:
    """The latent mixture's means and scales: point estimates in every fit (no guide on
    them), exported once, without draw dims."""
    mix = net.mixture
    return xr.Dataset(
        {
            "mu": (("cluster", "latent"), mix.loc.detach().cpu().numpy()),
            "sigma": (("cluster", "latent"), mix.scale.detach().cpu().numpy()),
        },
        coords={k: coords[k] for k in ("cluster", "latent")},
        attrs={"note": "point estimates of the latent mixture (no posterior draws exist)"},
    )


def _latent_group(z, cluster_prob, coords: dict, attrs: dict) -> xr.Dataset:
    return xr.Dataset(
        {
            "z": (("chain", "draw", "obs", "latent"), _cd(z)),
            "cluster_probability": (("chain", "draw", "obs", "cluster"), _cd(cluster_prob)),
        },
        coords={k: coords[k] for k in ("chain", "draw", "obs", "latent", "cluster")},
        attrs=attrs,
    )


def _predictive_group(net, predictive, coords: dict, ppc_samples: int, attrs) -> xr.Dataset:
    kept = {k: v for k, v in coords.items() if k != "draw"}
    kept["draw"] = coords["draw"][:ppc_samples]
    return xr.Dataset(
        {
            name: (("chain", "draw", "obs", *feature_dims(net, name)), _cd(v[:ppc_samples]))
            for name, v in predictive.items()
        },
        coords=kept,
        attrs={**attrs, "draws": f"the first {ppc_samples} draws of the posterior"},
    )


def _cd(x: torch.Tensor) -> np.ndarray:
    """(S, ...) -> (1, S, ...) on the host: one chain."""
    return x.detach().cpu().numpy()[None]


def _local_draws(
    net: PIMAModule, batch: Batch, names: list[str], draws: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per draw s: ``z_s ~ q(z | all observed)`` (S, N, D), from the mixture prior for rows
    with nothing observed, and :math:`p(c \\mid z_s, y, g_s)` (S, N, K)."""
    num_samples = draws["pi"].shape[0]
    loc, log_var = encode(net, batch.values, batch.observed)
    z = latent_distribution(loc, log_var).sample((num_samples,))
    observed_any = torch.stack([batch.observed[n] for n in names]).any(0)
    if not bool(observed_any.all()):
        prior_z = sample_mixture_prior(net, (num_samples, batch.size))
        z = torch.where(observed_any[None, :, None], z, prior_z)
    log_pi = log_weights_of(draws["pi"], net.mixture.active)  # (S, K)
    log_joint = log_pi[:, None, :] + net.mixture.component().log_prob(z.unsqueeze(-2))
    physics = [n for n in names if net.is_physics(n)]
    for terms in physics_cluster_terms(net, batch, physics, draws).values():
        log_joint = log_joint + terms
    return z, cluster_log_posterior_from_joint(log_joint).exp()


def _posterior_predictive(
    net: PIMAModule,
    batch: Batch,
    names: list[str],
    draws: dict[str, torch.Tensor],
    z: torch.Tensor,
    cluster_prob: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Replicates of every modality: data ones from ``p(x | z_s)``, physics ones from
    ``c_s ~ p(c | z_s, y, g_s)`` and ``y | c_s, g_s``."""
    num_samples, n, k = cluster_prob.shape
    c = torch.multinomial(cluster_prob.reshape(-1, k), 1).reshape(num_samples, n)
    draw_index = torch.arange(num_samples, device=c.device)[:, None]
    out = {}
    for name in names:
        module = net.modalities[name]
        if not net.is_physics(name):
            out[name] = module.likelihood(z).sample()
            continue
        means = module.expert.expected_curve(draws[f"theta_{name}"], module.grid)  # (S, K, T)
        noise = draws[f"noise_{name}"]  # (S, K)
        likelihood = curve_likelihood(Vindex(means)[draw_index, c], Vindex(noise)[draw_index, c])
        out[name] = likelihood.sample()
    return out


def _coords(net: PIMAModule, data: MultimodalData, names: list[str], num_samples: int) -> dict:
    coords: dict[str, Any] = {
        "chain": [0],
        "draw": np.arange(num_samples),
        "obs": np.arange(data.n_samples),
        "cluster": np.arange(net.n_clusters),
        "latent": np.arange(net.latent_dim),
    }
    for name in net.physics_names:
        expert = net.modalities[name].expert
        coords[f"{name}_param"] = np.array(expert.param_names, dtype=object)
    for name in names:
        coords.update(_feature_coords(net, name))
    return coords


def _posterior_vars(net: PIMAModule, draws: dict[str, torch.Tensor]) -> dict[str, tuple]:
    mix = net.mixture
    out = {
        "pi": (("chain", "draw", "cluster"), _cd(log_weights_of(draws["pi"], mix.active).exp())),
    }
    for name in net.physics_names:
        out[f"{name}_theta"] = (
            ("chain", "draw", "cluster", f"{name}_param"),
            _cd(draws[f"theta_{name}"]),
        )
        out[f"{name}_noise"] = (("chain", "draw", "cluster"), _cd(draws[f"noise_{name}"]))
    return out


def _log_likelihood_group(
    log_lik: dict[str, torch.Tensor],
    log_lik_se: dict[str, torch.Tensor],
    coords: dict,
    num_importance: int | None,
    attrs: dict[str, str],
) -> xr.Dataset:
    """``log_likelihood`` with the Monte-Carlo error of each variable in the attrs."""
    attrs = dict(attrs)
    if attrs.get("globals") == "point_estimate":
        attrs["warning"] = IN_SAMPLE_NOTE
    attrs["definition"] = (
        "log p(observed modalities of obs n | globals of the draw), marginal over c (exact) "
        "and z (importance sampling with the encoder as proposal); physics-only terms exact"
    )
    if num_importance is not None:
        attrs["importance_draws"] = int(num_importance)
    for name, se in log_lik_se.items():
        exact = bool((se == 0).all())
        attrs[f"{name}_mc_se_max"] = 0.0 if exact else float(se.max())
        attrs[f"{name}_mc_se_mean"] = 0.0 if exact else float(se.mean())
    variables = {name: (("chain", "draw", "obs"), _cd(v)) for name, v in log_lik.items()}
    return xr.Dataset(
        variables,
        coords={k: v for k, v in coords.items() if k in ("chain", "draw", "obs")},
        attrs=attrs,
    )


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


def mcmc_to_datatree(result: MCMCResult, log_likelihood_terms: bool = False) -> xr.DataTree:
    """NUTS draws as a tree: ``posterior`` (pi, <m>_theta, <m>_noise, relabelled),
    ``sample_stats`` (diverging, step_size, n_steps, tree_depth, lp), ``log_likelihood``
    (``total``, exact and marginal over c; per physics modality too with
    ``log_likelihood_terms``), ``observed_data`` (the curves) and ``constant_data`` (grids,
    masks)."""
    log_lik = result.log_likelihood
    if not log_likelihood_terms:
        log_lik = {"total": log_lik["total"]}
    chains, draws = result.samples["pi"].shape[:2]
    k = result.samples["pi"].shape[-1]
    n = next(iter(result.observed.values())).shape[0]
    coords: dict[str, Any] = {
        "chain": np.arange(chains),
        "draw": np.arange(draws),
        "cluster": np.arange(k),
        "obs": np.arange(n),
    }
    variables = {"pi": (("chain", "draw", "cluster"), result.samples["pi"])}
    for name, params in result.param_names.items():
        coords[f"{name}_param"] = np.array(params, dtype=object)
        coords[f"{name}_t"] = result.grids[name]
        variables[f"{name}_theta"] = (
            ("chain", "draw", "cluster", f"{name}_param"),
            result.samples[f"theta_{name}"],
        )
        variables[f"{name}_noise"] = (("chain", "draw", "cluster"), result.samples[f"noise_{name}"])
    method = f"NUTS (pyro), c enumerated, relabelled by {result.order_by}"
    attrs = _attrs(method, "mcmc")
    chain_draw = {"chain": coords["chain"], "draw": coords["draw"]}
    groups = {
        "posterior": xr.Dataset(
            variables, coords={c: v for c, v in coords.items() if c != "obs"}, attrs=attrs
        ),
        "sample_stats": xr.Dataset(
            {k2: (("chain", "draw"), v) for k2, v in result.sample_stats.items()},
            coords=chain_draw,
            attrs=attrs,
        ),
        "log_likelihood": xr.Dataset(
            {m: (("chain", "draw", "obs"), v) for m, v in log_lik.items()},
            coords={**chain_draw, "obs": coords["obs"]},
            attrs={**attrs, "definition": "log p(curves of obs n | draw), exact sum over c"},
        ),
        "observed_data": xr.Dataset(
            {m: (("obs", f"{m}_t"), v) for m, v in result.observed.items()},
            coords={c: v for c, v in coords.items() if c == "obs" or c.endswith("_t")},
            attrs={"note": "unobserved entries are zeros; see constant_data <name>_observed"},
        ),
        "constant_data": xr.Dataset(
            {
                **{f"{m}_observed": (("obs",), v) for m, v in result.masks.items()},
                **{f"{m}_grid": ((f"{m}_t",), v) for m, v in result.grids.items()},
            },
            coords={c: v for c, v in coords.items() if c == "obs" or c.endswith("_t")},
        ),
    }
    return _tree(groups)


def to_arviz(tree: xr.DataTree) -> Any:
    """What the installed ArviZ uses: the DataTree itself for ArviZ >= 1.0, else an
    ``arviz.InferenceData`` built from it (ArviZ 0.x)."""
    import arviz

    major = int(str(arviz.__version__).split(".")[0])
    if major >= 1:
        return tree
    return arviz.InferenceData.from_datatree(tree)
