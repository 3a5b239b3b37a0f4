r"""NUTS on the physics part of the Pyro model, with the cluster enumerated by Pyro.

The sampled model is :func:`pima_pyro.models.generative.physics_model`: the same global sites
and priors as ``bayesian_globals=True`` (:meth:`PIMAModule.global_prior_sites`) and the same
physics likelihood (:func:`pima_pyro.models.experts.curve_likelihood`), with ``c`` summed out
exactly by Pyro's enumeration (``max_plate_nesting=1``). Pyro's
:func:`~pyro.infer.mcmc.util.initialize_model` builds the potential and maps every constrained
site to unconstrained coordinates with ``biject_to(support)`` (stick-breaking for ``pi``,
``exp`` for the noise scales, the expert's own support for theta, e.g. ``exp`` for a
LogNormal-prior ``Custom`` parameter).

Label switching is handled by **relabelling**, not by the model: after sampling, every draw's
clusters are sorted by one parameter (``order_by=(modality, parameter index)``, default the
first parameter of the first physics modality), and ``pi``, every ``theta`` and ``noise`` are
permuted with them. The posterior is invariant under permutations of the labels, so sorting
maps each draw to one representative; ``r_hat`` across chains is then meaningful even if a
chain switches labels. (Starting chains from permuted labellings was tried: the standardising
map below is built for one labelling, and a chain started in another ran with mis-scaled
coordinates and long trajectories.)

NUTS moves in standardised coordinates (:func:`standardising_transforms`): the bijection of
each site's support followed by an affine map that centres the fitted estimate and divides by
its approximate posterior covariance (a per-cluster Cholesky factor), so one step size suits
every coordinate from the start. The mass matrix is the identity and is not adapted by
default (``adapt_mass_matrix``): in these coordinates the posterior is close to standard
normal, while the warm-up's mass-matrix estimates from 25-sample windows were not: a dense one
is rank-deficient in ~50 dimensions (every tree at the maximum depth of 1,023 leapfrog steps on
the decay curves) and a diagonal one still sent several warm-up trees to that depth.

Chains start from dispersed points: ``init_scale`` (default 3) approximate posterior standard
deviations of Gaussian jitter around the fitted estimates in every coordinate.

Optional data evidence: ``cluster_log_evidence`` (N, K) enters as a fixed factor per sample
(:math:`\log p(x_{D,n} \mid c)` from the fitted network, up to a constant in c), so the data
modalities inform membership too. It is off by default: without it, the NUTS posterior depends
only on the generative physics model and its priors (exact, and checked against conjugate
posteriors and by simulation-based calibration), while the network's evidence is an amortised
approximation whose errors would enter as fixed, possibly over-confident, weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model
from torch.distributions import ComposeTransform, Transform, biject_to, constraints

from pima_pyro.data import Batch
from pima_pyro.inference.marginal import pointwise_log_likelihood
from pima_pyro.inference.posterior import cluster_log_posterior
from pima_pyro.models.generative import MAX_PLATE_NESTING, physics_model
from pima_pyro.models.module import PIMAModule


@dataclass
class MCMCResult:
    """NUTS draws grouped by chain: ``samples[site]`` is (chains, draws, ...), relabelled.

    ``sample_stats``: ``diverging`` (bool), ``step_size``, ``n_steps`` (leapfrog steps),
    ``tree_depth`` (``log2(n_steps + 1)``), ``lp`` (log density in unconstrained coordinates),
    each (chains, draws); the last three are NaN for chains run in worker processes.
    ``log_likelihood[name]`` (chains, draws, N): exact pointwise physics log-likelihoods
    (marginal over c) and ``total``. ``observed``/``masks``/``grids``: the curves that were
    conditioned on, for the export.
    """

    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray]
    param_names: dict[str, tuple[str, ...]]
    order_by: tuple[str, int]
    log_likelihood: dict[str, np.ndarray] = field(default_factory=dict)
    observed: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    grids: dict[str, np.ndarray] = field(default_factory=dict)
    acceptance_rate: list[float] = field(default_factory=list)

    def to_datatree(self, log_likelihood_terms: bool = False) -> Any:
        """The draws as an ArviZ-schema ``xarray.DataTree``
        (:func:`~pima_pyro.inference.export.mcmc_to_datatree`)."""
        from pima_pyro.inference.export import mcmc_to_datatree  # export imports this module

        return mcmc_to_datatree(self, log_likelihood_terms)

    def to_arviz(self, log_likelihood_terms: bool = False) -> Any:
        """:meth:`to_datatree` in the installed ArviZ's type (``InferenceData`` on 0.x, so
        ``az.summary(result.to_arviz())`` works on both)."""
        from pima_pyro.inference.export import to_arviz

        return to_arviz(self.to_datatree(log_likelihood_terms))


class _CountingPotential:
    """The potential energy, counting its evaluations (one per leapfrog step)."""

    def __init__(self, potential_fn) -> None:
        self.potential_fn = potential_fn
        self.calls = 0

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        return self.potential_fn(params)


class _StatsRecorder:
    """``hook_fn`` of :class:`~pyro.infer.MCMC`: per sampling iteration, the number of
    leapfrog steps, the step size and the log density (all from public attributes)."""

    def __init__(self, counter: _CountingPotential) -> None:
        self.counter = counter
        self.records: list[tuple[float, float, float]] = []

    def __call__(self, kernel, params, stage, i) -> None:
        steps = self.counter.calls
        if stage.startswith("Sample"):
            with torch.no_grad():
                lp = -float(self.counter.potential_fn(params))
            self.records.append((float(steps), float(kernel.step_size), lp))
        self.counter.calls = 0


def physics_batch(curves: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> Batch:
    """A float64 CPU :class:`Batch` of the physics curves (what :func:`physics_model` sees)."""
    values = {n: torch.as_tensor(v, dtype=torch.float64).cpu() for n, v in curves.items()}
    observed = {n: torch.as_tensor(masks[n]).bool().cpu() for n in values}
    n = next(iter(values.values())).shape[0]
    return Batch(values=values, observed=observed, indices=torch.arange(n), n_total=n)


def physics_nuts(
    net: PIMAModule,
    curves: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    order_by: tuple[str, int] | None = None,
    cluster_log_evidence: torch.Tensor | None = None,
    condition: Mapping[str, torch.Tensor] | None = None,
    init_scale: float = 3.0,
    jit: bool = True,
    adapt_mass_matrix: bool = False,
    progress: bool = False,
) -> MCMCResult:
    """NUTS over ``pi``, ``theta_<m>``, ``noise_<m>`` of :func:`physics_model` given ``curves``.

    ``net`` supplies the experts, grids, priors and the start (its fitted globals); it is
    copied to float64 on the CPU and left untouched. ``condition`` fixes global sites to
    known values (``poutine.condition``, e.g. a known noise scale). ``jit`` compiles the
    potential (Pyro's ``jit_compile``; on by default: it halved the time per draw on the
    small simulation-based-calibration problem). ``adapt_mass_matrix`` adapts a diagonal mass
    matrix during warm-up on top of the standardisation (off by default; see the module
    docstring).
    """
    names = list(curves)
    _check_nuts_arguments(net, names, num_samples, warmup_steps, num_chains, init_scale)
    order_by = _checked_order_by(net, names, order_by)
    masks = masks or {n: torch.ones(len(curves[n]), dtype=torch.bool) for n in names}
    net64 = copy.deepcopy(net).double().cpu()
    batch = physics_batch(curves, masks)
    evidence = None if cluster_log_evidence is None else cluster_log_evidence.double().cpu()
    model, sites = _conditioned_model(net64, condition)
    pyro.set_rng_seed(seed)
    transforms = standardising_transforms(net64, batch, sites)
    _, potential_fn, transforms, _ = initialize_model(
        model,
        model_args=(net64, batch, evidence),
        transforms=transforms,
        max_plate_nesting=MAX_PLATE_NESTING,
        jit_compile=jit,
        skip_jit_warnings=True,
    )
    initial = _chain_starts(net64, transforms, init_scale, num_chains, seed)
    counter = _CountingPotential(potential_fn)
    recorder = _StatsRecorder(counter)
    kernel = NUTS(potential_fn=counter, adapt_mass_matrix=adapt_mass_matrix, target_accept_prob=0.8)
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        initial_params=initial,
        transforms=transforms,
        hook_fn=recorder,
        disable_progbar=not progress,
    )
    mcmc.run()
    samples = {k: v.detach() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    for site, value in (condition or {}).items():  # fixed sites: the same value in every draw
        value = torch.as_tensor(value, dtype=torch.float64)
        samples[site] = value.expand(num_chains, num_samples, *value.shape)
    samples = relabel(net64, net64.with_fixed_globals(samples, (num_chains, num_samples)), order_by)
    diagnostics = mcmc.diagnostics()  # r_hat and ESS of every site: computed once
    result = MCMCResult(
        samples={k: v.numpy() for k, v in samples.items()},
        sample_stats=_sample_stats(diagnostics, recorder, num_chains, num_samples),
        param_names={n: tuple(net64.modalities[n].expert.param_names) for n in names},
        order_by=tuple(order_by),
        observed={n: batch.values[n].numpy() for n in names},
        masks={n: batch.observed[n].numpy() for n in names},
        grids={n: net64.modalities[n].grid.numpy() for n in names},
        acceptance_rate=[float(v) for v in diagnostics.get("acceptance rate", {}).values()],
    )
    result.log_likelihood = _log_likelihood(net64, batch, samples, names)
    return result


def _checked_order_by(
    net: PIMAModule, names: list[str], order_by: tuple[str, int] | None
) -> tuple[str, int]:
    order_by = order_by or (names[0], 0)
    if (
        order_by[0] not in names
        or not 0 <= order_by[1] < net.modalities[order_by[0]].expert.num_params
    ):
        raise ValueError(f"order_by: {order_by!r} names no (physics modality, parameter index)")
    return order_by


def _conditioned_model(
    net64: PIMAModule, condition: Mapping[str, torch.Tensor] | None
) -> tuple[Callable[..., None], set[str]]:
    """:func:`physics_model` with the ``condition`` sites fixed, and the sites left to sample."""
    sites = {site for site, _ in net64.global_prior_sites()}
    unknown = set(condition or {}) - sites
    if unknown:
        raise ValueError(
            f"physics_nuts: condition names {sorted(unknown)}, not global sites of the model "
            f"({sorted(sites)})"
        )
    if not condition:
        return physics_model, sites
    data = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in condition.items()}
    return pyro.poutine.condition(physics_model, data=data), sites - set(condition)


def _chain_starts(
    net64: PIMAModule, transforms: dict, init_scale: float, num_chains: int, seed: int
) -> dict[str, torch.Tensor]:
    """One dispersed start per chain, stacked (unstacked for a single chain)."""
    generator = torch.Generator().manual_seed(seed)
    starts = [dispersed_start(net64, transforms, init_scale, generator) for _ in range(num_chains)]
    initial = {k: torch.stack([s[k] for s in starts]) for k in starts[0]}
    return {k: v[0] for k, v in initial.items()} if num_chains == 1 else initial


def _check_nuts_arguments(net, names, num_samples, warmup_steps, num_chains, init_scale) -> None:
    if not names:
        raise ValueError("physics_nuts: needs at least one physics modality")
    if not bool(net.mixture.active.all()):
        # relabelling reorders clusters per draw; the fixed inactive mask would follow no one
        raise ValueError(
            "physics_nuts: the model has inactive clusters (pruned by fit, prune_clusters=True); "
            "NUTS with relabelling needs every cluster active: refit with prune_clusters=False "
            "and n_clusters set to the number of active clusters"
        )
    for name in names:
        if name not in net.physics_names:
            raise ValueError(f"physics_nuts: '{name}' is not a physics modality of the model")
    for label, value, low in (
        ("num_samples", num_samples, 1),
        ("warmup_steps", warmup_steps, 0),
        ("num_chains", num_chains, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"physics_nuts: {label} must be an int >= {low}, got {value!r}")
    if not (isinstance(init_scale, int | float) and math.isfinite(init_scale) and init_scale >= 0):
        raise ValueError(f"physics_nuts: init_scale must be a float >= 0, got {init_scale!r}")


@torch.no_grad()
def standardising_transforms(
    net: PIMAModule, batch: Batch, sites: set[str]
) -> dict[str, torch.distributions.Transform]:
    r"""Per global site, the map to NUTS's coordinates: ``biject_to(support).inv`` followed by
    :math:`u \mapsto L^{-1}(u - \hat u)`, with :math:`\hat u` the fitted estimate and
    :math:`L` the Cholesky factor of its approximate posterior covariance per cluster
    (:meth:`PIMAModule.laplace_scales`, at cluster sizes from the exact p(c | curves);
    :math:`(N\pi_c + 1)^{-1/2}` for the stick-breaking coordinates of pi). The posterior is
    then roughly standard normal in every coordinate, so NUTS needs short trajectories from
    its first warm-up step instead of adapting a mass matrix across scales that differ by
    orders of magnitude (the cost on the decay curves)."""
    point = net.point_globals()
    resp = cluster_log_posterior(net, batch, list(batch.values)).exp()  # exact: physics only
    counts = {n: (resp * batch.observed[n][:, None]).sum(0) for n in batch.values}
    scale_trils = {"pi": torch.diag_embed((batch.size * point["pi"][:-1] + 1.0).rsqrt())}
    for name, (theta_cov, log_noise_sd) in net.laplace_scales(counts).items():
        scale_trils[f"theta_{name}"] = torch.linalg.cholesky(theta_cov)
        scale_trils[f"noise_{name}"] = torch.diag_embed(log_noise_sd.exp())
    transforms = {}
    for site, prior in net.global_prior_sites():
        if site not in sites:
            continue
        to_unconstrained = biject_to(prior.support).inv
        centre = to_unconstrained(point[site])
        affine = BlockAffine(centre, scale_trils[site].to(centre))
        transforms[site] = ComposeTransform([to_unconstrained, affine.inv])
    return transforms


class BlockAffine(Transform):
    r""":math:`x \mapsto m + L x` on the last dim, with lower-triangular :math:`L` (..., P, P)
    batched over the leading dims of ``loc`` (..., P); the whole of ``loc``'s shape is the
    event (the log-Jacobian :math:`\sum \log \operatorname{diag} L` is one number)."""

    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        self.loc = loc
        self.scale_tril = scale_tril
        self.domain = constraints.independent(constraints.real, loc.dim())
        self.codomain = constraints.independent(constraints.real, loc.dim())
        super().__init__()

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        diff = (y - self.loc).unsqueeze(-1)
        return torch.linalg.solve_triangular(self.scale_tril, diff, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum()
        return log_det.expand(x.shape[: x.dim() - self.loc.dim()])


@torch.no_grad()
def dispersed_start(
    net: PIMAModule,
    transforms: Mapping[str, torch.distributions.Transform],
    init_scale: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One chain's start in NUTS's coordinates: ``init_scale`` approximate posterior standard
    deviations of Gaussian jitter around the fitted estimate in every coordinate."""
    point = net.point_globals()
    start = {}
    for site, transform in transforms.items():
        centre = transform(point[site])
        eps = torch.randn(centre.shape, generator=generator, dtype=centre.dtype)
        start[site] = centre + init_scale * eps
    return start


def relabel(
    net: PIMAModule, samples: Mapping[str, torch.Tensor], order_by: tuple[str, int]
) -> dict[str, torch.Tensor]:
    """Sort every draw's clusters by ``theta_<order_by[0]>[..., order_by[1]]`` and permute
    ``pi``, ``theta_<m>`` and ``noise_<m>`` with them (draws keep their leading dims)."""
    name, index = order_by
    key = samples[f"theta_{name}"][..., index]  # (..., K)
    perm = torch.argsort(key, dim=-1)
    out = {}
    for site, value in samples.items():
        if site == "pi" or site.startswith("noise_"):
            out[site] = torch.gather(value, -1, perm)
        elif site.startswith("theta_"):
            out[site] = torch.gather(value, -2, perm[..., None].expand_as(value))
        else:
            out[site] = value
    return out


def _sample_stats(diagnostics: dict, recorder: _StatsRecorder, chains: int, draws: int) -> dict:
    diverging = np.zeros((chains, draws), dtype=bool)
    for chain, indices in enumerate(diagnostics.get("divergences", {}).values()):
        for i in indices:
            if 0 <= int(i) < draws:
                diverging[chain, int(i)] = True
    records = np.full((chains, draws, 3), np.nan)
    if len(recorder.records) == chains * draws:
        records = np.asarray(recorder.records, dtype=float).reshape(chains, draws, 3)
    n_steps = records[..., 0]
    return {
        "diverging": diverging,
        "n_steps": n_steps,
        "tree_depth": np.log2(n_steps + 1),
        "step_size": records[..., 1],
        "lp": records[..., 2],
    }


@torch.no_grad()
def _log_likelihood(
    net: PIMAModule, batch: Batch, samples: Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, np.ndarray]:
    """Exact pointwise log-likelihoods per draw, (chains, draws, N), in chunks of draws."""
    chains, draws = samples["pi"].shape[:2]
    flat = {k: v.reshape(chains * draws, *v.shape[2:]) for k, v in samples.items()}
    parts: dict[str, list[torch.Tensor]] = {}
    step = max(1, 2**24 // max(1, batch.size * net.n_clusters))
    for start in range(0, chains * draws, step):
        chunk = {k: v[start : start + step] for k, v in flat.items()}
        log_lik, _ = pointwise_log_likelihood(net, batch, chunk, names)
        for k, v in log_lik.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).reshape(chains, draws, batch.size).numpy() for k, v in parts.items()}
