r"""The SVI objective and what the fit does around it.

The objective is the ELBO of :func:`pima_pyro.models.generative.model` under
:func:`pima_pyro.models.guide.guide`, with the cluster ``c`` summed out exactly by
``TraceEnum_ELBO`` (``JitTraceEnum_ELBO`` with ``jit=True``): :func:`per_sample_loss`. This
module also holds the minibatch and its random draws (:func:`minibatch`), the physics EM start
(:func:`initialize_from_physics`), the phases' frozen parameters (:func:`frozen_parameters`),
the non-finite diagnosis (:func:`describe_nonfinite`) and the warnings after a fit. The loop
that uses them is :class:`~pima_pyro.inference.training_plan.PIMATrainingPlan`, run by
:func:`pima_pyro.inference.training.fit` (the schedule is described there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import JitTraceEnum_ELBO, TraceEnum_ELBO

from pima_pyro.data import Batch
from pima_pyro.inference.initialization import (
    EMResult,
    physics_mixture_em,
    summary_features,
)
from pima_pyro.models.experts import PhysicsExpert
from pima_pyro.models.generative import MAX_PLATE_NESTING, model
from pima_pyro.models.guide import guide
from pima_pyro.models.mixture import log_weights_of
from pima_pyro.models.module import PIMAModule


@dataclass
class History:
    """Per-epoch training record (negative ELBO per sample, lower is better)."""

    loss: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    em_log_likelihood: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "loss": list(self.loss),
            "phase": list(self.phase),
            "seconds": list(self.seconds),
            "em_log_likelihood": self.em_log_likelihood,
        }

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(
            loss=list(d["loss"]),
            phase=list(d["phase"]),
            seconds=list(d["seconds"]),
            em_log_likelihood=d.get("em_log_likelihood"),
        )


class NonFiniteELBOError(FloatingPointError):
    """The ELBO became NaN or infinite during :func:`fit`."""


def describe_nonfinite(net: PIMAModule, batch: Batch) -> str:
    """Name the non-finite parameters, sites (``c``, ``z``, ``x_*``, ``y_*``) and gradients of
    one ELBO evaluation on ``batch``."""
    with pyro.validation_enabled(False):
        return _describe_nonfinite(net, batch)


def _describe_nonfinite(net: PIMAModule, batch: Batch) -> str:
    bad_params = [n for n, p in net.named_parameters() if not bool(torch.isfinite(p).all())]
    try:
        bad_sites = _nonfinite_sites(net, batch)
    except (RuntimeError, ValueError) as exc:  # e.g. a NaN weight that cannot even be sampled
        bad_sites = [f"(tracing the model failed: {str(exc).splitlines()[0]})"]
    bad_grads: list[str] = []
    try:
        loss = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(
            model, guide, net, batch
        )
        net.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            bad_grads = [
                n
                for n, p in net.named_parameters()
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
    except (RuntimeError, ValueError) as exc:
        bad_grads = [f"(the gradient could not be computed: {str(exc).splitlines()[0]})"]
    net.zero_grad(set_to_none=True)
    return (
        f"non-finite sites {bad_sites or 'none'}; non-finite parameters {bad_params or 'none'}; "
        f"parameters with non-finite gradients {bad_grads or 'none'}"
    )


def _nonfinite_sites(net: PIMAModule, batch: Batch) -> list[str]:
    guide_trace = poutine.trace(guide).get_trace(net, batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(net, batch)
    bad_sites = []
    for label, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, node in trace.nodes.items():
            if node["type"] != "sample":
                continue
            log_prob = node["fn"].log_prob(node["value"])
            if not bool(torch.isfinite(log_prob).all()):
                bad_sites.append(f"{name} ({label})")
    return bad_sites


def forget_registered_parameters(prefix: str = "pima") -> None:
    """Drop ``prefix$$$*`` entries from Pyro's param store.

    ``pyro.module`` keeps the first tensor registered under a name; a later model (or the same
    one after ``.to(device)``) would otherwise be shadowed by stale tensors, which breaks
    ``JitTraceEnum_ELBO`` (it feeds the store's tensors to the traced function).
    """
    store = pyro.get_param_store()
    for key in list(store.keys()):
        if key.startswith(prefix + "$$$"):
            del store[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; a device this machine lacks is a
    ``ValueError`` that lists the devices it has."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            have = ["cpu"] + [f"cuda:{i}" for i in range(count)]
            raise ValueError(f"device: {device!r} is not available on this machine; it has {have}")
    return resolved


def random_encode_masks(
    observed: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Each observed modality kept with probability 1/2; a sample that keeps none keeps all."""
    names = list(observed)
    obs = torch.stack([observed[n] for n in names])  # (M, B)
    keep = torch.rand(obs.shape, device=obs.device, generator=generator) < 0.5
    keep = keep & obs
    none_kept = ~keep.any(0, keepdim=True)
    keep = torch.where(none_kept, obs, keep)
    return {n: keep[i] for i, n in enumerate(names)}


def initialize_from_physics(
    net: PIMAModule, full: Batch, seed: int = 0, em_starts: int = 10, prune: bool = False
) -> EMResult:
    """Step 1 of the recipe: EM on the physics modalities sets pi, theta and s (in place), and
    marks the clusters that EM's pruning emptied inactive (``prune``; see
    :func:`~pima_pyro.inference.initialization.physics_mixture_em`).

    Warns when a physics parameter ended where it started in every cluster: the likelihood is
    flat in it there (give ``Custom(init=...)`` or a prior that covers the data) or it is not
    identified. Returns the :class:`~pima_pyro.inference.initialization.EMResult`.
    """
    physics = net.physics_names
    dtype = net.mixture.loc.dtype
    experts = {p: net.modalities[p].expert for p in physics}
    starts = {p: e.theta.detach().clone() for p, e in experts.items()}
    em = physics_mixture_em(
        curves={p: full.values[p] for p in physics},
        masks={p: full.observed[p] for p in physics},
        experts=experts,
        grids={p: net.modalities[p].grid for p in physics},
        n_clusters=net.n_clusters,
        n_starts=em_starts,
        seed=seed,
        prune=prune,
        start_features=_data_summaries(net, full),
    )
    set_physics_from_em(net, em)
    for p in physics:
        warn_unmoved_parameters(
            p, experts[p], starts[p][em.active], em.theta[p][em.active], net.modalities[p].grid
        )
    counts = {
        p: (em.responsibilities * full.observed[p][:, None]).sum(0).to(dtype) for p in physics
    }
    net.init_global_guide(em.weights, full.n_total, counts)
    return em


@torch.no_grad()
def set_physics_from_em(net: PIMAModule, em: EMResult) -> None:
    """Experts' theta and noise, the active clusters and the mixture weights from ``em``;
    clusters that hold no sample take the heaviest one's theta and noise
    (:func:`parked_clusters`)."""
    dtype = net.mixture.loc.dtype
    for p in net.physics_names:
        expert = net.modalities[p].expert
        theta, noise = em.theta[p].to(dtype), em.noise_scale[p].to(dtype)
        in_support = expert.support.check(theta).reshape(theta.shape[0], -1).all(-1)
        usable = em.active & in_support.to(em.active.device)
        theta, noise = parked_clusters(theta, noise, usable, em.weights)
        expert.set_theta(theta)
        expert.set_noise_scale(noise)
    net.mixture.active.copy_(em.active)
    net.mixture.logits.copy_(log_weights_of(em.weights, em.active).to(dtype))


def parked_clusters(
    theta: torch.Tensor, noise: torch.Tensor, usable: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta`` (K, P) and ``noise`` (K,) with every cluster that is not ``usable`` (K,)
    (the caller's: active and inside the prior's support), or whose estimate is not finite
    (an empty cluster's M-step), set to the heaviest usable cluster's.
    Why: a cluster with weight 0 takes no sample, but its parameters still set the experts'
    per-parameter optimisation scale (the largest magnitude over clusters) and enter every
    enumerated likelihood: left where EM dropped them (a logistic's t0 at 34 on a grid over
    [0, 1]) they multiplied the active clusters' effective step and overflowed the law."""
    usable = usable & torch.isfinite(theta).all(-1) & torch.isfinite(noise)
    if bool(usable.all()) or not bool(usable.any()):
        return theta, noise
    heaviest = torch.where(usable, weights, torch.full_like(weights, -1.0)).argmax()
    theta = torch.where(usable[:, None], theta, theta[heaviest])
    return theta, torch.where(usable, noise, noise[heaviest])


def _data_summaries(net: PIMAModule, full: Batch) -> np.ndarray | None:
    """Principal-component summaries of every data modality, joined: (N, F), or ``None``."""
    parts = [summary_features(full.values[d], full.observed[d]) for d in net.data_names]
    return np.concatenate(parts, axis=1) if parts else None


#: An encoder whose means vary across samples by less than this fraction of its own posterior
#: variance carries no information about its input (posterior collapse).
COLLAPSE_RATIO: float = 1e-3


@torch.no_grad()
def encoder_information(net: PIMAModule, full: Batch, max_rows: int = 4096) -> dict[str, float]:
    """Per data modality, the spread of its encoder's means across observed samples relative to its
    posterior variance: :math:`\\overline{\\operatorname{Var}_n \\mu_{nd}} /
    \\overline{\\sigma^2_{nd}}` over the first ``max_rows`` observed samples. Near 0 the
    encoder returns the same Gaussian for every input."""
    out = {}
    for name in net.data_names:  # a physics modality informs c exactly, through p(y | c)
        rows = torch.nonzero(full.observed[name]).flatten()[:max_rows]
        if rows.numel() < 2:
            continue
        loc, log_var = net.modalities[name].encoder(full.values[name][rows])
        out[name] = float(loc.var(0).mean() / torch.exp(log_var).mean())
    return out


def warn_collapsed_encoders(net: PIMAModule, full: Batch) -> None:
    """``UserWarning`` naming each modality whose encoder collapsed (:func:`encoder_information`
    below :data:`COLLAPSE_RATIO`): queries given that modality alone return the mixture prior."""
    collapsed = {n: r for n, r in encoder_information(net, full).items() if r < COLLAPSE_RATIO}
    if collapsed:
        warnings.warn(
            f"fit: the encoder of modality(ies) {sorted(collapsed)} ignores its input "
            f"(spread of its means / its variance = "
            f"{ {n: float(f'{r:.2g}') for n, r in collapsed.items()} }): cluster and latent "
            "queries given it alone carry no information. Refit with another seed, more "
            "samples with that modality paired, or a likelihood that weighs it more",
            stacklevel=3,
        )


def warn_unmoved_parameters(
    name: str, expert: PhysicsExpert, start: torch.Tensor, fitted: torch.Tensor, t: torch.Tensor
) -> None:
    """``UserWarning`` naming each parameter of ``expert`` that EM left where it started in
    every cluster, or in which the fitted curves (K', T) are flat (their derivative is zero in
    every cluster at the ``fitted`` theta (K', P)): either way the data do not determine it."""
    if fitted.shape[0] == 0:
        return
    start = start.to(fitted)
    unmoved = torch.isclose(fitted, start, rtol=1e-6, atol=1e-9).all(0)
    jac = expert.curve_jacobian(expert.theta_transform.inv(fitted.detach()), t.to(fitted))
    sensitivity = jac.abs().amax(dim=(0, 1))  # (P,)
    flat = sensitivity <= 1e-8 * (
        1.0 + float(expert.expected_curve(fitted, t.to(fitted)).abs().max())
    )
    suspect = unmoved | flat
    if bool(suspect.any()):
        params = [expert.param_names[i] for i in torch.nonzero(suspect).flatten().tolist()]
        warnings.warn(
            f"modality '{name}': physics parameter(s) {params} did not move from their start "
            "during EM or the curves do not depend on them at the fit: the data do not "
            "determine them there. Give a start near the data (Custom(init=...)) or a prior "
            "whose draws cover it, or check that the parameter is identified by the grid",
            stacklevel=3,
        )


#: The phases of the schedule, in order.
PHASES: tuple[str, ...] = ("warmup", "anchor", "full")


def frozen_parameters(net: PIMAModule, physics_started: bool) -> dict[str, tuple[str, ...]]:
    """Name prefixes of the parameters each phase holds fixed: the warm-up freezes the mixture
    (and the experts EM set), the anchor phase the experts and the mixture weights."""
    experts = tuple(f"modalities.{p}.expert." for p in net.physics_names) if physics_started else ()
    return {
        "warmup": ("mixture.", *experts),
        "anchor": ("mixture.logits", "q_pi_log_concentration", *experts),
        "full": (),
    }


def per_sample_loss(
    net: PIMAModule, n_total: int, jit: bool = False
) -> Callable[[Batch], torch.Tensor]:
    """``batch -> -ELBO / n_total``: the differentiable training objective of one minibatch.

    With ``jit`` the ELBO is ``JitTraceEnum_ELBO`` and the batch travels as flat tensors (the
    tracer accepts tensors only; the module and ``n_total`` are closed over), so the batch size
    must stay fixed between calls.
    """
    names = net.modality_names
    forget_registered_parameters()  # the store must hold this module's tensors (JIT inputs)
    if not jit:
        elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)

        def loss(batch: Batch) -> torch.Tensor:
            return elbo.differentiable_loss(model, guide, net, batch) / n_total

        return loss

    jit_elbo = JitTraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING, ignore_jit_warnings=True)
    m = len(names)

    def unflatten(args: tuple[torch.Tensor, ...]) -> Batch:
        return Batch(
            values=dict(zip(names, args[1 : 1 + m], strict=True)),
            observed=dict(zip(names, args[1 + m : 1 + 2 * m], strict=True)),
            indices=args[0],
            n_total=n_total,
            encode=dict(zip(names, args[1 + 2 * m : 1 + 3 * m], strict=True)),
            noise=args[1 + 3 * m] if len(args) > 1 + 3 * m else None,
        )

    def flat_model(*args: torch.Tensor) -> None:
        model(net, unflatten(args))

    def flat_guide(*args: torch.Tensor) -> None:
        guide(net, unflatten(args))

    def jit_loss(batch: Batch) -> torch.Tensor:
        encode_masks = batch.encode if batch.encode is not None else batch.observed
        args = (
            batch.indices,
            *(batch.values[k] for k in names),
            *(batch.observed[k] for k in names),
            *(encode_masks[k] for k in names),
            *(() if batch.noise is None else (batch.noise,)),
        )
        if not compiled:
            # Tracing runs the model once with its own random draws; do it on the side so that
            # the global RNG stream (and thus a resumed run) is the same as without tracing.
            devices = [args[0].device] if args[0].device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                jit_elbo.differentiable_loss(flat_model, flat_guide, *args)
            compiled.append(True)
        return jit_elbo.differentiable_loss(flat_model, flat_guide, *args) / n_total

    compiled: list[bool] = []
    return jit_loss


def minibatch(
    full: Batch,
    idx: torch.Tensor,
    encode_subsets: bool,
    gen: torch.Generator | None,
    latent_dim: int | None = None,
) -> Batch:
    """The samples ``idx`` of ``full``; with ``encode_subsets`` the random modality subsets of
    :func:`random_encode_masks`, and with ``latent_dim`` the standard-normal draws of ``z``
    (B, latent_dim), both drawn from ``gen`` in that order."""
    observed = {n: m[idx] for n, m in full.observed.items()}
    encode = random_encode_masks(observed, gen) if encode_subsets else None
    noise = None
    if latent_dim is not None:
        dtype = next(iter(full.values.values())).dtype
        noise = torch.randn(idx.shape[0], latent_dim, generator=gen, device=idx.device, dtype=dtype)
    return Batch(
        values={n: v[idx] for n, v in full.values.items()},
        observed=observed,
        indices=idx,
        n_total=full.n_total,
        encode=encode,
        noise=noise,
    )


@torch.no_grad()
def validation_loss(net: PIMAModule, batch: Batch) -> float:
    """``-ELBO / n`` of ``batch`` (every observed modality encoded), without a gradient."""
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    return elbo.loss(model, guide, net, batch) / batch.n_total
