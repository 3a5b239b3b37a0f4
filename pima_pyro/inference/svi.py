r"""Fitting: stochastic variational inference with ``TraceEnum_ELBO``.

The objective is the ELBO of :func:`pima_pyro.models.generative.model` under
:func:`pima_pyro.models.guide.guide`, with the cluster ``c`` summed out exactly by
``TraceEnum_ELBO`` (``JitTraceEnum_ELBO`` by default, ``jit=True``). Each step takes Pyro's
``differentiable_loss`` and an Adam step on the module's parameters: this is what
``pyro.infer.SVI.step`` does, minus its per-step host synchronisation (``loss.item()``), so the
loop never waits on the device; the loss is read back once per epoch.

Schedule (DESIGN section 8):

1. physics first: EM on the physics modalities alone sets :math:`\pi`, :math:`\theta_{mc}`,
   :math:`s_{mc}` (:func:`~pima_pyro.inference.initialization.physics_mixture_em`);
2. warm-up (by default only without a physics modality): ``warmup_epochs`` of the autoencoder
   with the mixture frozen at :math:`\mathcal N(0, I)` components and the experts frozen (a
   plain multimodal VAE);
3. mixture start after a warm-up: :math:`\mu_c, \sigma_c` from the embeddings weighted by the
   EM responsibilities (a GMM on the embeddings without physics);
3b. anchor (by default the first quarter of the epochs after EM): the experts and the mixture
   weights stay at their EM values while the encoders and the latent mixture learn to agree
   with them; freed too early, the experts follow responsibilities that a still random latent
   mixture distorts, and close clusters merge;
4. everything free for the remaining epochs.

Throughout, the guide encodes a random subset of each sample's observed modalities (each kept
with probability 1/2; a sample that draws none keeps all), while the model scores every observed
modality: any ``q`` gives a valid lower bound, and this one teaches every encoder to place its
modality alone in the right cluster.
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import JitTraceEnum_ELBO, TraceEnum_ELBO
from torch import nn
from tqdm.auto import tqdm

from pima_pyro.data import Batch, MultimodalData
from pima_pyro.inference.closed_form import closed_form_loss
from pima_pyro.inference.initialization import (
    EMResult,
    mixture_from_embeddings,
    physics_mixture_em,
    summary_features,
)
from pima_pyro.inference.posterior import latent_posterior
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


#: Version of the checkpoint layout written by :func:`fit`.
CHECKPOINT_FORMAT = 1


def _atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _get_rng_state(gen: torch.Generator) -> dict[str, object]:
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    return {
        "module": copy.deepcopy(net.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "rng": _get_rng_state(gen),
    }


def _restore(snapshot: dict, net: nn.Module, opt: torch.optim.Optimizer, gen) -> None:
    net.load_state_dict(snapshot["module"])
    opt.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
    _set_rng_state(snapshot["rng"], gen)


def describe_nonfinite(net: PIMAModule, batch: Batch) -> str:
    """Name the non-finite parameters, sites (``c``, ``z``, ``x_*``, ``y_*``) and gradients of
    one ELBO evaluation on ``batch``."""
    with pyro.validation_enabled(False):
        return _describe_nonfinite(net, batch)


def _describe_nonfinite(net: PIMAModule, batch: Batch) -> str:
    bad_params = [n for n, p in net.named_parameters() if not bool(torch.isfinite(p).all())]
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
    loss = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(
        model, guide, net, batch
    )
    net.zero_grad(set_to_none=True)
    bad_grads = []
    if loss.requires_grad:
        loss.backward()
        bad_grads = [
            n
            for n, p in net.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
    net.zero_grad(set_to_none=True)
    return (
        f"non-finite sites {bad_sites or 'none'}; non-finite parameters {bad_params or 'none'}; "
        f"parameters with non-finite gradients {bad_grads or 'none'}"
    )


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
    """``"auto"`` is CUDA when available, else CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    with torch.no_grad():
        for p in physics:
            experts[p].set_theta(em.theta[p].to(dtype))
            experts[p].set_noise_scale(em.noise_scale[p].to(dtype))
            warn_unmoved_parameters(
                p, experts[p], starts[p][em.active], em.theta[p][em.active], net.modalities[p].grid
            )
        net.mixture.active.copy_(em.active)
        net.mixture.logits.copy_(log_weights_of(em.weights, em.active).to(dtype))
    counts = {
        p: (em.responsibilities * full.observed[p][:, None]).sum(0).to(dtype) for p in physics
    }
    net.init_global_guide(em.weights, full.n_total, counts)
    return em


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
    transform = expert.theta_transform
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(
            lambda u: expert.expected_curve(transform(u), t.to(fitted)),
            transform.inv(fitted.detach()),
        )  # (K', T, K', P)
    sensitivity = jac.abs().amax(dim=(0, 1, 2))  # (P,)
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


def _frozen_parameters(net: PIMAModule, physics_started: bool) -> dict[str, tuple[str, ...]]:
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
            encode=dict(zip(names, args[1 + 2 * m :], strict=True)),
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


def minibatch(full: Batch, idx: torch.Tensor, encode_subsets: bool, gen) -> Batch:
    observed = {n: m[idx] for n, m in full.observed.items()}
    return Batch(
        values={n: v[idx] for n, v in full.values.items()},
        observed=observed,
        indices=idx,
        n_total=full.n_total,
        encode=random_encode_masks(observed, gen) if encode_subsets else None,
    )


def fit(
    net: PIMAModule,
    data: MultimodalData,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 5e-3,
    warmup_epochs: int | None = None,
    anchor_epochs: int | None = None,
    subset_training: bool = True,
    jit: bool | None = None,
    objective: str = "elbo",
    device: str | torch.device = "auto",
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    em_starts: int = 10,
    prune_clusters: bool = False,
    clip_norm: float | None = 100.0,
    callback: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> History:
    """Train ``net`` on ``data`` in place; returns the :class:`History`.

    Args:
        epochs: total passes over the data, warm-up included.
        batch_size: minibatch size (the plate subsample; the ELBO is scaled by N / B).
        lr: Adam learning rate.
        warmup_epochs: epochs of step 2; default 0 when EM on physics modalities started the
            mixture, ``max(1, epochs // 10)`` otherwise; 0 skips steps 2-3.
        anchor_epochs: epochs, after any warm-up, with the physics experts and the mixture
            weights held at their EM values while the encoders and the latent mixture align
            with them (step 3b); default ``epochs // 4`` after EM, else 0.
        subset_training: encode random modality subsets (see module docstring).
        em_starts: EM starts of step 1 (the best is kept, then improved by split-and-merge).
        prune_clusters: in step 1, make inactive (weight exactly 0, reported by
            ``PIMA.mixture_parameters()["active"]``) every cluster whose removal lowers the
            physics mixture's BIC, so that a K above the data's leaves the surplus empty. Only
            with a physics modality; pass ``False`` when clusters share one physics law and
            only other modalities tell them apart.
        objective: ``"elbo"`` (Pyro's enumerated ELBO) or ``"closed_form"`` (the seed's closed-form
            mixture terms, :mod:`pima_pyro.inference.closed_form`; ``jit`` does not apply).
        jit: use ``JitTraceEnum_ELBO`` (default for ``objective="elbo"``; ``jit=True`` with
            ``objective="closed_form"`` is refused: that objective is plain torch). It
            computes the same loss as ``TraceEnum_ELBO`` (equal to float precision at the
            same seed) and a step took 0.59x the time on the digits toy
            (``benchmarks/speed.py``); each epoch drops its last incomplete batch to keep
            shapes fixed (a different random remainder every epoch).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...; data are moved there once.
        seed: seeds torch, numpy and Pyro; same seed, data and device give the same result.
        num_threads: torch intra-op threads (``None`` leaves torch's setting).
        callback: called as ``callback(epoch, loss)`` after every epoch.
        checkpoint_dir: write ``checkpoint.pt`` there (atomically: write, then rename) every
            ``checkpoint_every`` epochs and at the end: module, optimiser, RNG states,
            history, EM responsibilities.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` when it exists; the result equals
            an uninterrupted run with the same settings (checked: the settings fingerprint must
            match).
        on_step: called as ``on_step(epoch, step)`` after every optimiser step (for tests and
            instrumentation; it must not draw random numbers).

    Raises:
        NonFiniteELBOError: the loss became NaN/inf. The epoch is replayed to name the step, the
            sites and the parameters involved; the last good parameters are restored (and
            written to ``checkpoint_dir``); no non-finite value is ever written to disk.
    """
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"fit: batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"fit: checkpoint_every must be >= 1, got {checkpoint_every}")
    if objective not in ("elbo", "closed_form"):
        raise ValueError(f"fit: objective must be 'elbo' or 'closed_form', got {objective!r}")
    if objective == "closed_form" and net.bayesian_globals:
        raise ValueError(
            "fit: objective='closed_form' with bayesian_globals=True is not supported (the "
            "closed form is written for point-estimate globals); use objective='elbo'"
        )
    if objective == "closed_form" and jit:
        raise ValueError(
            "fit: objective='closed_form' with jit=True is not supported (JIT applies to the "
            "Pyro ELBO only); leave jit unset or pass jit=False"
        )
    jit = objective == "elbo" if jit is None else bool(jit)
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir")
    checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir) / "checkpoint.pt"
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    pyro.set_rng_seed(seed)
    np.random.seed(seed)
    forget_registered_parameters()
    device = resolve_device(device)
    net.to(device)
    net.train()
    dtype = next(net.parameters()).dtype
    full = data.to_batch(device=device, dtype=dtype)
    n = full.n_total
    batch_size = min(batch_size, n)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    history = History()
    fingerprint = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_samples": n,
        "jit": jit,
        "objective": objective,
        "subset_training": subset_training,
        "modalities": list(net.modality_names),
        "n_clusters": net.n_clusters,
        "latent_dim": net.latent_dim,
        "prune_clusters": prune_clusters,
    }
    resume_state = None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        resume_state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if resume_state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"fit: {checkpoint_path} is not a pima-pyro checkpoint")
        if resume_state["fingerprint"] != fingerprint:
            raise ValueError(
                f"fit: cannot resume from {checkpoint_path}: it was written with settings "
                f"{resume_state['fingerprint']}, this call has {fingerprint}"
            )

    # 1. physics first
    responsibilities = None
    physics = net.physics_names
    if resume_state is not None:
        net.load_state_dict(resume_state["module"])
        if resume_state["responsibilities"] is not None:
            responsibilities = resume_state["responsibilities"].to(device)
        warmup_epochs = resume_state["warmup_epochs"]
        anchor_epochs = resume_state.get("anchor_epochs", 0)
    elif physics:
        em = initialize_from_physics(
            net, full, seed=seed, em_starts=em_starts, prune=prune_clusters
        )
        responsibilities = em.responsibilities
        history.em_log_likelihood = em.log_likelihood
    if warmup_epochs is None:
        # With physics, EM already fixes the clusters and a warm-up only hurt here (digits toy,
        # 200 epochs, seed 0: image-only test accuracy 0.883 with 20 warm-up epochs, 0.952
        # without); without physics the GMM on warmed-up embeddings is the only start.
        warmup_epochs = 0 if responsibilities is not None else max(1, epochs // 10)
    warmup_epochs = max(0, min(warmup_epochs, epochs - 1))
    assert warmup_epochs is not None

    if anchor_epochs is None:
        # EM fixed the physics, but the latent mixture starts anywhere: while it is not yet
        # aligned, the joint responsibilities drag the experts (digits + ExponentialDecay,
        # seed 0: two rates merged, joint test accuracy 0.88; 50 anchored epochs: 0.98)
        anchor_epochs = epochs // 4 if responsibilities is not None else 0
    anchor_epochs = max(0, min(anchor_epochs, epochs - warmup_epochs - 1))
    frozen_by_phase = _frozen_parameters(net, responsibilities is not None)

    def phase_of(epoch: int) -> str:
        if epoch < warmup_epochs:
            return "warmup"
        return "anchor" if epoch < warmup_epochs + anchor_epochs else "full"

    def optimizer_for(phase: str) -> torch.optim.Optimizer:
        frozen = frozen_by_phase[phase]
        params = [p for name, p in net.named_parameters() if not name.startswith(frozen)]
        return torch.optim.Adam(params, lr=lr)

    if warmup_epochs > 0 and resume_state is None:
        with torch.no_grad():
            net.mixture.set_parameters(
                torch.softmax(net.mixture.logits, -1),
                torch.zeros_like(net.mixture.loc),
                torch.ones_like(net.mixture.loc),
            )
    optimizer = optimizer_for(phase_of(0))

    if objective == "elbo":
        objective_fn = per_sample_loss(net, n, jit)
    else:
        objective_fn = partial(closed_form_loss, net)

    def train_step(batch: Batch, opt: torch.optim.Optimizer) -> torch.Tensor:
        loss = objective_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
        opt.step()
        return loss.detach()

    n_batches = n // batch_size if jit else math.ceil(n / batch_size)

    def epoch_batches() -> list[torch.Tensor]:
        perm = torch.randperm(n, device=device, generator=gen)
        return [perm[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]

    def run_epoch(epoch: int, phase: str, opt: torch.optim.Optimizer) -> tuple[float, int]:
        """Returns the mean loss and the first non-finite step (-1 if none)."""
        start = time.perf_counter()
        total = torch.zeros((), device=device, dtype=dtype)
        # tracked on the device: no host sync inside the loop
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        for b, idx in enumerate(epoch_batches()):
            batch = minibatch(full, idx, subset_training, gen)
            loss = train_step(batch, opt)
            bad_now = (~torch.isfinite(loss)) & (first_bad < 0)
            first_bad = torch.where(bad_now, torch.full_like(first_bad, b), first_bad)
            total = total + loss
            if on_step is not None:
                on_step(epoch, b)
        value = float(total) / n_batches  # one sync per epoch
        history.loss.append(value)
        history.phase.append(phase)
        history.seconds.append(time.perf_counter() - start)
        return value, int(first_bad)

    def diagnose(epoch: int, bad_step: int, opt: torch.optim.Optimizer) -> str:
        """Replay the epoch from its start up to ``bad_step`` and name what went non-finite."""
        for b, idx in enumerate(epoch_batches()):
            batch = minibatch(full, idx, subset_training, gen)
            if b == bad_step:
                return describe_nonfinite(net, batch)
            train_step(batch, opt)
            if on_step is not None:
                on_step(epoch, b)
        return "the replay did not reproduce it (non-deterministic kernels?)"

    start_epoch = 0
    if resume_state is not None:
        start_epoch = int(resume_state["epoch"])
        optimizer = optimizer_for(phase_of(start_epoch))
        if start_epoch > 0 and phase_of(start_epoch - 1) == phase_of(start_epoch):
            optimizer.load_state_dict(resume_state["optimizer"])  # else a new phase starts
        _set_rng_state(resume_state["rng"], gen)
        history = History.from_dict(resume_state["history"])

    def save(epoch_count: int, opt: torch.optim.Optimizer) -> None:
        if checkpoint_path is None:
            return
        if not all(bool(torch.isfinite(v).all()) for v in net.state_dict().values()):
            raise FloatingPointError("fit: refusing to write a checkpoint with non-finite values")
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "epoch": epoch_count,
                "warmup_epochs": warmup_epochs,
                "anchor_epochs": anchor_epochs,
                "module": net.state_dict(),
                "optimizer": opt.state_dict(),
                "responsibilities": None
                if responsibilities is None
                else responsibilities.detach().cpu(),
                "history": history.as_dict(),
                "rng": _get_rng_state(gen),
            },
            checkpoint_path,
        )

    bar = tqdm(total=epochs, initial=start_epoch, disable=not progress, desc="pima", unit="epoch")
    # Inputs are validated once by MultimodalData; per-step distribution argument checks would
    # cost a host sync each and turn a NaN into a ValueError deep inside torch instead of the
    # diagnosed NonFiniteELBOError below.
    validation = pyro.validation_enabled(False)
    validation.__enter__()
    try:
        for epoch in range(start_epoch, epochs):
            if epoch == warmup_epochs and warmup_epochs > 0:
                # 3. mixture start from the embeddings
                loc, scale = latent_posterior(net, full, net.modality_names)
                log_var = 2 * torch.log(scale)
                weights, mu, scale = mixture_from_embeddings(
                    loc, log_var, responsibilities, net.n_clusters, seed=seed
                )
                net.mixture.set_parameters(weights, mu, scale)
            phase = phase_of(epoch)
            if epoch > 0 and phase != phase_of(epoch - 1):
                optimizer = optimizer_for(phase)
            snapshot = _snapshot(net, optimizer, gen)
            value, bad_step = run_epoch(epoch, phase, optimizer)
            if bad_step >= 0 or not math.isfinite(value):
                _restore(snapshot, net, optimizer, gen)
                cause = diagnose(epoch, bad_step, optimizer) if bad_step >= 0 else "unknown"
                _restore(snapshot, net, optimizer, gen)
                history.loss.pop()
                history.phase.pop()
                history.seconds.pop()
                saved = ""
                if checkpoint_path is not None:
                    save(epoch, optimizer)
                    saved = f" and saved to {checkpoint_path}"
                raise NonFiniteELBOError(
                    f"fit: the ELBO became non-finite at epoch {epoch}, step {bad_step} "
                    f"({phase} phase): {cause}. The parameters from the start of epoch {epoch} "
                    f"(the last good state) were restored{saved}."
                )
            if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs:
                save(epoch + 1, optimizer)
            bar.set_postfix(loss=f"{value:.4g}", phase=phase)
            bar.update(1)
            if callback is not None:
                callback(epoch, value)
    finally:
        validation.__exit__(None, None, None)
        bar.close()
    net.eval()
    warn_collapsed_encoders(net, full)
    return history
