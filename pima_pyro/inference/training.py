r"""``fit``: the start of DESIGN section 8, then the one training loop on Lightning.

The schedule:

1. physics first: EM on the physics modalities alone sets :math:`\pi`, :math:`\theta_{mc}`,
   :math:`s_{mc}` (:func:`~pima_pyro.inference.svi.initialize_from_physics`);
2. warm-up (by default only without a physics modality): ``warmup_epochs`` of the autoencoder
   with the mixture frozen at :math:`\mathcal N(0, I)` components and the experts frozen (a
   plain multimodal VAE);
3. mixture start after a warm-up: :math:`\mu_c, \sigma_c` from the embeddings weighted by the
   EM responsibilities (a GMM on the embeddings without physics);
4. anchor (by default the first quarter of the epochs after EM): the experts and the mixture
   weights stay at their EM values while the encoders and the latent mixture learn to agree
   with them; freed too early, the experts follow responsibilities that a still random latent
   mixture distorts, and close clusters merge;
5. everything free for the remaining epochs.

Steps 2-5 are epochs of :class:`~pima_pyro.inference.training_plan.PIMATrainingPlan` run by a
``lightning.Trainer``: on one device, or data-parallel (``strategy="ddp"``: spawned processes
on this machine, gloo on CPU and nccl on CUDA; under ``torchrun`` or SLURM, the processes that
launcher started).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyro
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy

from pima_pyro.data import MultimodalData
from pima_pyro.files import PIMAFileError, digest, tree_digest
from pima_pyro.inference.callbacks import (
    EpochEndCheckpoint,
    RNGStateCallback,
    WeightsOnlyCheckpointIO,
    previous_checkpoint,
)
from pima_pyro.inference.posterior import cluster_log_posterior
from pima_pyro.inference.svi import (
    History,
    forget_registered_parameters,
    initialize_from_physics,
    resolve_device,
    warn_collapsed_encoders,
)
from pima_pyro.inference.training_plan import LoopOptions, PIMATrainingPlan, Schedule
from pima_pyro.models.module import PIMAModule

#: Version of the checkpoint layout written by :func:`fit` (2: Lightning checkpoints).
CHECKPOINT_FORMAT = 2
#: The checkpoint :func:`fit` writes in ``checkpoint_dir`` and resumes from.
CHECKPOINT_NAME = "checkpoint"
#: Where the default ``CSVLogger`` writes when no ``log_dir`` or ``checkpoint_dir`` is given.
DEFAULT_LOG_DIR = "pima_logs"
#: Values of ``precision`` the loop runs in: mixed precision is refused (a log-sum-exp over
#: clusters of float16 log-densities loses the small posteriors that the queries report), and
#: so is "64-true" (the data and the queries are float32).
PRECISIONS = (None, 32, "32", "32-true")


@dataclass
class FitOptions:
    """Every option of :func:`fit` and :meth:`pima_pyro.PIMA.fit` (keyword arguments).

    Attributes:
        epochs: total passes over the data, warm-up included.
        batch_size: minibatch size per process (the plate subsample; the ELBO is scaled by
            N / B). Under ``strategy="ddp"`` a step takes ``devices * batch_size`` samples.
        lr: Adam learning rate.
        lr_decay: the learning rate falls along a half cosine from ``lr`` to ``lr * lr_decay``
            over the epochs after the warm-up and anchor phases (set at the start of each
            epoch, so a resumed fit follows the same schedule); ``1`` keeps it constant.
            A falling step lets the stochastic-gradient fit settle: with a constant step the
            digits demo's image-only test accuracy wanders by +-0.015 from one epoch to the
            next at the end of a fit. No effect when at most one epoch follows the anchor.
        warmup_epochs: epochs of step 2; default 0 when EM on physics modalities started the
            mixture, ``max(1, epochs // 10)`` otherwise; 0 skips steps 2-3.
        anchor_epochs: epochs, after any warm-up, with the physics experts and the mixture
            weights held at their EM values while the encoders and the latent mixture align
            with them (step 4); default ``epochs // 4`` after EM, else 0.
        subset_training: encode random subsets of each sample's observed modalities (each kept
            with probability 1/2; a sample that draws none keeps all), while the model scores
            every observed modality: any ``q`` gives a valid lower bound, and this one teaches
            every encoder to place its modality alone in the right cluster.
        em_starts: EM starts of step 1 (the best is kept, then improved by split-and-merge).
        prune_clusters: in step 1, make inactive (weight exactly 0, reported by
            ``PIMA.mixture_parameters()["active"]``) every cluster whose removal lowers the
            BIC of the physics mixture, so that a K above the data's leaves the surplus
            empty: with a data modality, BIC of the curves given the data modalities
            (:func:`~pima_pyro.inference.gated_em.prune_gated`), else of the curves. On by
            default; pass ``False`` when clusters share one physics law and only other
            modalities tell them apart (the curves cannot pay for such a cluster), or for
            :func:`~pima_pyro.inference.mcmc.physics_nuts`, which needs every cluster.
        cross_modal_weight: weight of the cross-modal cluster term's paired part
            (:mod:`~pima_pyro.inference.cross_modal`): on samples with a data modality and a
            physics modality observed, the cross-entropy from the cluster posterior given the
            curves (and, ramped in by ``self_training_ramp``, the data modalities) to the one
            each data encoder implies alone. It trains the encoders only (the generative
            parameters follow the ELBO alone). The logged ``train_loss`` is the -ELBO either
            way.
        self_training_weight: weight of the cross-modal term's self-training part: on
            samples with a data modality and no physics modality, the cross-entropy from
            their sharpened (temperature 1/2) cluster posterior given every observed data
            modality to the one each data encoder implies alone (encoders only, as above).
            With ``cross_modal_weight=0`` as well, the loop trains on the plain ELBO.
        self_training_ramp: the self-training weight at epoch ``e`` (from 0) is its value
            times ``f = min(1, (e + 1) / max(1, self_training_ramp * epochs))``, and the
            paired part's target weighs the data modalities' evidence by the power ``f``
            (from close to the physics posterior, ``f = 1 / (self_training_ramp * epochs)``
            in the first epoch, to the posterior given the curves and the data at ``f = 1``;
            with ``self_training_weight=0`` too): both rise linearly over this fraction of
            the epochs, as semi-supervised training ramps its unlabelled term (Laine and
            Aila, 2017), because targets from an encoder that has not yet met the physics'
            clusters reinforce its first guesses. In ``[0, 1]``; ``0`` (or
            ``self_training_ramp * epochs <= 1``) applies both in full from the start. A fit
            stopped early (``early_stopping_patience``) may end inside the ramp.
        joint_moves: rounds of split-and-merge moves judged by the joint ELBO at the end
            of the anchor phase (:mod:`~pima_pyro.inference.joint_moves`): each round keeps
            the move that raises the ELBO most on up to 5,000 rows, if any. ``0`` skips them;
            they need a physics and a data modality, an anchor phase, point-estimate globals
            and at least three active clusters, and are skipped otherwise.
        objective: ``"elbo"`` (Pyro's enumerated ELBO) or ``"closed_form"`` (the seed's
            closed-form mixture terms, :mod:`pima_pyro.inference.closed_form`).
        jit: use ``JitTraceEnum_ELBO`` (default for ``objective="elbo"``; refused with
            ``objective="closed_form"``). Each epoch then drops its last incomplete batch to
            keep shapes fixed (as data-parallel training always does).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; or give ``accelerator`` and
            ``devices`` as to ``lightning.Trainer``.
        seed: seeds torch, numpy and Pyro; the permutations, modality subsets and latent
            draws of epoch e, step s come from a generator seeded by (seed, e, s), so the
            same seed, data and device give the same result on any number of processes.
        num_threads: torch intra-op threads (``None`` leaves torch's setting).
        callback: called as ``callback(epoch, loss)`` after every epoch.
        checkpoint_dir: write ``checkpoint.ckpt`` (a Lightning checkpoint, atomically) there
            every ``checkpoint_every`` epochs and at the end; the CSV logs go to its ``logs``.
        resume: continue from ``checkpoint_dir/checkpoint.ckpt`` when it exists (read with
            ``weights_only=True``); the result equals an uninterrupted run with the same
            settings (checked: the settings fingerprint must match).
        on_step: called as ``on_step(epoch, step)`` after every optimiser step (for tests and
            instrumentation; it must not draw random numbers).
        strategy: ``None`` (one process) or ``"ddp"`` (Lightning's data-parallel strategy;
            ``devices`` processes per node on ``num_nodes`` nodes).
        precision: ``"32-true"`` (the default and the only one: mixed precision and
            ``"64-true"`` are refused, naming the objective).
        validation_fraction: hold out this fraction of the samples (seeded) and log
            ``val_loss`` (-ELBO per sample) and, with labels, ``val_accuracy`` each epoch.
        early_stopping_patience: stop when ``val_loss`` has not improved for this many epochs.
        logger: a Lightning logger, ``False`` for none; default a ``CSVLogger`` in ``log_dir``
            (default ``checkpoint_dir/logs``, else ``./pima_logs``).
        verbose: show Lightning's banner and warnings.

    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 5e-3
    lr_decay: float = 0.1
    warmup_epochs: int | None = None
    anchor_epochs: int | None = None
    subset_training: bool = True
    jit: bool | None = None
    objective: str = "elbo"
    device: str | torch.device = "auto"
    seed: int = 0
    num_threads: int | None = None
    progress: bool = True
    em_starts: int = 10
    prune_clusters: bool = True
    cross_modal_weight: float = 1.0
    self_training_weight: float = 1.0
    self_training_ramp: float = 0.5
    joint_moves: int = 3
    clip_norm: float | None = 100.0
    callback: Callable[[int, float], None] | None = None
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int = 1
    resume: bool = False
    on_step: Callable[[int, int], None] | None = None
    accelerator: str | None = None
    devices: int | list[int] | str = 1
    strategy: str | None = None
    num_nodes: int = 1
    precision: str | int | None = None
    validation_fraction: float = 0.0
    early_stopping_patience: int | None = None
    logger: Logger | bool | None = None
    log_dir: str | os.PathLike[str] | None = None
    verbose: bool = False

    @classmethod
    def from_keywords(cls, options: dict[str, Any]) -> FitOptions:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"fit: unknown option(s) {unknown}; the options are {names}")
        made = cls(**options)
        made.check_types()
        return made

    def check_types(self) -> None:
        """Numbers where numbers are expected (numpy scalars included), in range."""
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("checkpoint_every", 1),
            ("em_starts", 1),
            ("joint_moves", 0),
            ("num_nodes", 1),
            ("seed", 0),
        ):
            _check_int(name, getattr(self, name), low)
        if self.seed >= 2**32:  # numpy's global seed is 32-bit
            raise ValueError(f"fit: seed must be < 2**32, got {self.seed}")
        for name in ("warmup_epochs", "anchor_epochs", "num_threads", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0 if "epochs" in name else 1)
        _check_positive("lr", self.lr)
        _check_positive("lr_decay", self.lr_decay)
        if float(self.lr_decay) > 1.0:
            raise ValueError(f"fit: lr_decay must be in (0, 1], got {self.lr_decay!r}")
        self.lr_decay = float(self.lr_decay)
        for name in ("cross_modal_weight", "self_training_weight"):
            _check_non_negative(name, getattr(self, name))
            setattr(self, name, float(getattr(self, name)))
        ramp = self.self_training_ramp
        _check_number("self_training_ramp", ramp)
        if not 0.0 <= float(ramp) <= 1.0:  # NaN fails too
            raise ValueError(f"fit: self_training_ramp must be in [0, 1], got {ramp!r}")
        self.self_training_ramp = float(ramp)
        if self.clip_norm is not None:
            _check_positive("clip_norm", self.clip_norm)
            self.clip_norm = float(self.clip_norm)
        self.lr = float(self.lr)
        for f in fields(self):  # numpy scalars become Python numbers (Lightning checks types)
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, f.name, int(value))
        if not isinstance(self.validation_fraction, numbers.Real) or not (
            0.0 <= float(self.validation_fraction) < 1.0
        ):
            raise ValueError(
                f"fit: validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )  # fmt: skip

    def fingerprint(self, net: PIMAModule, n_samples: int) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        keys = (
            "epochs",
            "batch_size",
            "lr",
            "lr_decay",
            "seed",
            "objective",
            "subset_training",
            "prune_clusters",
            "validation_fraction",
            "em_starts",
            "cross_modal_weight",
            "self_training_weight",
            "self_training_ramp",
            "joint_moves",
        )
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out.update(
            n_samples=n_samples,
            jit=self.resolved_jit,
            n_clusters=net.n_clusters,
            modalities=list(net.modality_names),
            latent_dim=net.latent_dim,
        )
        return out  # fmt: skip

    @property
    def resolved_jit(self) -> bool:
        return self.objective == "elbo" if self.jit is None else bool(self.jit)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fit: {name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"fit: {name} must be >= {low}, got {value}")


def _check_number(name: str, value: object) -> None:
    """A ``TypeError`` naming ``name`` unless ``value`` is a real number (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fit: {name} must be a number, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    _check_number(name, value)
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"fit: {name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: object) -> None:
    _check_number(name, value)
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"fit: {name} must be a finite number >= 0, got {value!r}")


def data_digest(data: MultimodalData) -> str:
    """SHA-256 of the values, masks and grids a fit trains on (a resumed fit must match)."""
    tensors = {f"values/{k}": v for k, v in data.values.items()}
    tensors |= {f"masks/{k}": m for k, m in data.masks.items()}
    tensors |= {f"grids/{k}": g for k, g in data.grids.items()}
    return digest("", tensors)


def check_fit_options(opts: FitOptions, bayesian: bool) -> None:
    """Refuse every combination the loop does not run, naming both options."""
    objective, jit, strategy = opts.objective, opts.jit, opts.strategy
    if objective not in ("elbo", "closed_form"):
        raise ValueError(f"fit: objective must be 'elbo' or 'closed_form', got {objective!r}")
    if objective == "closed_form" and bayesian:
        raise ValueError(
            "fit: objective='closed_form' with bayesian_globals=True is not supported (the "
            "closed form is written for point-estimate globals); use objective='elbo'"
        )
    if objective == "closed_form" and jit:
        raise ValueError(
            "fit: objective='closed_form' with jit=True is not supported (JIT applies to the "
            "Pyro ELBO only); leave jit unset or pass jit=False"
        )
    if strategy not in (None, "ddp"):
        raise ValueError(f"fit: strategy must be None or 'ddp', got {strategy!r}")
    for name in ("devices", "num_nodes"):
        if (
            strategy is None
            and getattr(opts, name) not in (1, [0], "auto")
            and not (
                name == "devices" and isinstance(opts.devices, list) and len(opts.devices) == 1
            )
        ):
            raise ValueError(
                f"fit: {name}={getattr(opts, name)!r} with strategy=None (one process); pass "
                "strategy='ddp' to train on several devices"
            )
    for name in ("callback", "on_step"):
        if strategy == "ddp" and getattr(opts, name) is not None:
            raise ValueError(
                f"fit: strategy='ddp' with {name} is not supported (spawned processes "
                "cannot call back into this one); use a Lightning logger or strategy=None"
            )
    if opts.precision not in PRECISIONS:
        raise ValueError(
            f"fit: precision={opts.precision!r} is not supported with objective={objective!r} "
            "(the enumerated mixture needs float32 and the data are float32); use '32-true'"
        )
    if opts.resume and opts.checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir")
    if opts.early_stopping_patience is not None and not opts.validation_fraction:
        raise ValueError(
            "fit: early_stopping_patience needs validation_fraction > 0 (it stops on the "
            "validation ELBO)"
        )


def hardware(
    device: str | torch.device, accelerator: str | None, devices: int | list[int] | str
) -> tuple[str, int | list[int] | str]:
    """``(accelerator, devices)`` for the Trainer from ``device`` (``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``) or from an explicit ``accelerator``."""
    if accelerator is not None:
        if str(device) not in ("auto", accelerator):
            raise ValueError(
                f"fit: device={str(device)!r} and accelerator={accelerator!r} disagree; "
                "give one of them"
            )
        return accelerator, devices
    device = str(device)
    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), devices
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"fit: device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}")
    if kind == "cuda":
        resolve_device(device)  # one home for "is this device here": lists the devices it has
    if index:
        if devices not in (1, [int(index)]):
            raise ValueError(f"fit: device={device!r} and devices={devices!r} disagree")
        return kind, [int(index)]
    return kind, devices


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The pima-pyro part of a checkpoint (format, settings, schedule), read with
    ``weights_only=True`` (a file cannot run code) and its weights' SHA-256 digest checked;
    :class:`~pima_pyro.files.PIMAFileError` naming the file for anything else."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, foreign, or a pickle carrying code
        raise PIMAFileError(f"fit: cannot read the checkpoint {path}: {exc}") from exc
    meta = payload.get("pima") if isinstance(payload, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise PIMAFileError(
            f"fit: {path} is not a pima-pyro checkpoint of format {CHECKPOINT_FORMAT}"
        )
    if tree_digest({k: v for k, v in payload.items() if k != "pima"}) != meta.get("digest"):
        raise PIMAFileError(f"fit: the checkpoint {path} is corrupted (its digest differs)")
    return meta


def resume_point(path: Path, fingerprint: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from: ``path``, or the previous one (with a warning) when
    ``path`` fails its checks; a ``ValueError`` naming every setting that differs."""
    previous = previous_checkpoint(path)
    try:
        meta = read_checkpoint(path)
    except PIMAFileError as exc:
        if not previous.exists():
            raise
        warnings.warn(f"{exc}; resuming from the previous checkpoint {previous}", stacklevel=3)
        path, meta = previous, read_checkpoint(previous)
    written = meta["fingerprint"]
    differ = sorted(
        k for k in set(written) | set(fingerprint) if written.get(k) != fingerprint.get(k)
    )
    if differ:
        detail = {k: (written.get(k), fingerprint.get(k)) for k in differ}
        raise ValueError(
            f"fit: cannot resume from {path}: it was written with other settings or data "
            f"(name: (checkpoint, this call)): {detail}"
        )
    return path, meta


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed write left behind (``checkpoint[.prev].ckpt.*.tmp``)."""
    for pattern in (f"{CHECKPOINT_NAME}.ckpt.*.tmp", f"{CHECKPOINT_NAME}.prev.ckpt.*.tmp"):
        for stale in directory.glob(pattern):
            stale.unlink(missing_ok=True)


class CheckpointMetadata(pl.Callback):
    """Writes the settings and the schedule into every checkpoint (``checkpoint["pima"]``)."""

    def __init__(
        self, fingerprint: dict[str, Any], schedule: Schedule, em_log_likelihood: float | None
    ) -> None:
        self.fingerprint, self.schedule = fingerprint, schedule
        self.em_log_likelihood = em_log_likelihood

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        done = int((pl_module.history_phase >= 0).sum())
        checkpoint["pima"] = {
            # everything Lightning wrote before this hook: weights, optimisers, loops, RNG
            "digest": tree_digest({k: v for k, v in checkpoint.items() if k != "pima"}),
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "warmup_epochs": self.schedule.warmup_epochs,
            "anchor_epochs": self.schedule.anchor_epochs,
            "epochs_completed": done,
            "em_log_likelihood": self.em_log_likelihood,
        }


def make_schedule(
    epochs: int, warmup_epochs: int | None, anchor_epochs: int | None, physics_started: bool
) -> Schedule:
    if warmup_epochs is None:
        # With physics, EM already fixes the clusters and a warm-up only hurt here (digits toy,
        # 200 epochs, seed 0: image-only test accuracy 0.883 with 20 warm-up epochs, 0.952
        # without); without physics the GMM on warmed-up embeddings is the only start.
        warmup_epochs = 0 if physics_started else max(1, epochs // 10)
    warmup_epochs = max(0, min(warmup_epochs, epochs - 1))
    if anchor_epochs is None:
        # EM fixed the physics, but the latent mixture starts anywhere: while it is not yet
        # aligned, the joint responsibilities drag the experts (digits + ExponentialDecay,
        # seed 0: two rates merged, joint test accuracy 0.88; 50 anchored epochs: 0.98)
        anchor_epochs = epochs // 4 if physics_started else 0
    anchor_epochs = max(0, min(anchor_epochs, epochs - warmup_epochs - 1))
    return Schedule(epochs, warmup_epochs, anchor_epochs)


def split_validation(
    data: MultimodalData, fraction: float, seed: int
) -> tuple[MultimodalData, MultimodalData | None]:
    """A seeded random ``fraction`` of the samples held out for validation."""
    if not fraction:
        return data, None
    n_val = int(round(fraction * data.n_samples))
    if n_val < 1 or n_val >= data.n_samples:
        raise ValueError(
            f"fit: validation_fraction={fraction} leaves {n_val} of {data.n_samples} samples "
            "for validation; it must leave at least one on each side"
        )
    perm = np.random.default_rng(seed).permutation(data.n_samples)
    return data.subset(np.sort(perm[n_val:])), data.subset(np.sort(perm[:n_val]))


@contextlib.contextmanager
def quiet_lightning(verbose: bool) -> Iterator[None]:
    """Lightning's banner (GPU/TPU lines, model summary) only when ``verbose``."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        if not verbose:
            for lg in loggers:
                lg.setLevel(logging.WARNING)
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*when logging on epoch level in dist.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def make_trainer(
    opts: FitOptions,
    schedule: Schedule,
    hardware_choice: tuple[str, int | list[int] | str],
    ckpt_path: Path | None,
    metadata: CheckpointMetadata,
    has_validation: bool,
) -> pl.Trainer:
    accelerator, devices = hardware_choice
    callbacks: list[pl.Callback] = [RNGStateCallback(), metadata]
    if ckpt_path is not None:
        callbacks.append(EpochEndCheckpoint(ckpt_path, opts.checkpoint_every))
    if opts.early_stopping_patience is not None:
        callbacks.append(EarlyStopping("val_loss", patience=opts.early_stopping_patience))
    logger = opts.logger
    if logger is None or logger is True:
        save_dir = opts.log_dir or (ckpt_path.parent / "logs" if ckpt_path else DEFAULT_LOG_DIR)
        logger = CSVLogger(save_dir=save_dir, name="pima")
    strategy: Any = "auto"
    if opts.strategy == "ddp":
        strategy = DDPStrategy(
            start_method="spawn",
            process_group_backend="nccl" if accelerator == "cuda" else "gloo",
            find_unused_parameters=True,  # the variational globals' guide leaves some unused
        )
    extra = {} if opts.precision is None else {"precision": opts.precision}
    return pl.Trainer(
        max_epochs=schedule.epochs, accelerator=accelerator, devices=devices,
        strategy=strategy, num_nodes=opts.num_nodes, callbacks=callbacks, logger=logger,
        use_distributed_sampler=False, num_sanity_val_steps=0, enable_model_summary=False,
        enable_checkpointing=ckpt_path is not None, log_every_n_steps=1,
        enable_progress_bar=bool(opts.progress), limit_val_batches=1.0 if has_validation else 0,
        plugins=[WeightsOnlyCheckpointIO()], **extra,
    )  # fmt: skip


def start_from_physics(
    net: PIMAModule,
    data: MultimodalData,
    seed: int,
    em_starts: int,
    prune: bool,
    refit: bool = False,
) -> tuple[torch.Tensor | None, float | None]:
    """Step 1 (when there is a physics modality): EM responsibilities and log-likelihood.

    ``refit`` (the module was trained before): EM numbers its clusters afresh, so the latent
    mixture's components are permuted to follow them (:func:`align_latent_mixture`); else the
    anchor phase would start by moving every encoder's samples to another component."""
    if not net.physics_names:
        return None, None
    full = data.to_batch(device=net.mixture.loc.device, dtype=net.mixture.loc.dtype)
    previous = None
    if refit:
        with torch.no_grad():
            previous = cluster_log_posterior(net, full, net.modality_names, num_samples=0).exp()
    em = initialize_from_physics(net, full, seed=seed, em_starts=em_starts, prune=prune)
    if previous is not None:
        align_latent_mixture(net, previous, em.responsibilities)
    return em.responsibilities.cpu(), em.log_likelihood


def matching_permutation(previous: torch.Tensor, current: torch.Tensor) -> np.ndarray:
    r"""``perm`` (K,) with ``perm[c]`` the previous cluster matched to current cluster ``c``:
    the one-to-one matching that maximises the samples they share,
    :math:`\sum_c \sum_n r_{nc}\, p_{n,\mathrm{perm}[c]}` (Hungarian algorithm), from
    responsibilities ``previous`` and ``current`` (N, K)."""
    from scipy.optimize import linear_sum_assignment

    shared = (current.double().T @ previous.double().to(current.device)).cpu().numpy()
    rows, cols = linear_sum_assignment(-shared)
    perm = np.empty(shared.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


@torch.no_grad()
def align_latent_mixture(net: PIMAModule, previous: torch.Tensor, current: torch.Tensor) -> None:
    """Give current cluster c the latent component of the previous cluster matched to it."""
    perm = torch.as_tensor(matching_permutation(previous, current), device=net.mixture.loc.device)
    net.mixture.loc.copy_(net.mixture.loc[perm])
    net.mixture.unconstrained_scale.copy_(net.mixture.unconstrained_scale[perm])


def reset_mixture_for_warmup(net: PIMAModule) -> None:
    """Step 2's frozen mixture: N(0, I) components, the weights kept."""
    with torch.no_grad():
        net.mixture.set_parameters(
            torch.softmax(net.mixture.logits, -1),
            torch.zeros_like(net.mixture.loc),
            torch.ones_like(net.mixture.loc),
        )


def loop_options(opts: FitOptions) -> LoopOptions:
    """What a training step needs of the fit options."""
    names = [f.name for f in fields(LoopOptions) if f.name != "jit"]
    return LoopOptions(jit=opts.resolved_jit, **{name: getattr(opts, name) for name in names})


def validated_options(options: dict[str, Any], bayesian: bool) -> FitOptions:
    """Every check of the options that needs no data: before any model is built."""
    opts = FitOptions.from_keywords(options)
    check_fit_options(opts, bayesian)
    hardware(opts.device, opts.accelerator, opts.devices)
    return opts


def fit(net: PIMAModule, data: MultimodalData, *, refit: bool = False, **options: Any) -> History:
    """Train ``net`` on ``data`` in place; returns the :class:`History`. The options are the
    fields of :class:`FitOptions` (an unknown one is a ``TypeError`` that lists them).
    ``refit``: ``net`` was trained before (see :func:`start_from_physics`).

    Raises:
        NonFiniteELBOError: the loss became NaN/inf. The epoch is replayed to name the step, the
            sites and the parameters involved; the parameters from the start of that epoch are
            restored; no non-finite value is ever written to disk.
    """
    opts = validated_options(options, net.bayesian_globals)
    choice = hardware(opts.device, opts.accelerator, opts.devices)
    if opts.num_threads is not None:
        torch.set_num_threads(opts.num_threads)
    pyro.set_rng_seed(opts.seed)
    np.random.seed(opts.seed)
    forget_registered_parameters()
    train, validation = split_validation(data, opts.validation_fraction, opts.seed)
    fingerprint = opts.fingerprint(net, data.n_samples)
    fingerprint["data_digest"] = data_digest(data)
    ckpt_dir = None if opts.checkpoint_dir is None else Path(opts.checkpoint_dir)
    ckpt_path = None if ckpt_dir is None else ckpt_dir / f"{CHECKPOINT_NAME}.ckpt"
    if ckpt_dir is not None and ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"fit: checkpoint_dir={str(ckpt_dir)!r} is a file, not a directory")
    resume_meta, resume_from = None, None
    if ckpt_dir is not None and ckpt_dir.is_dir():
        remove_stale_temporaries(ckpt_dir)
    if opts.resume and ckpt_path is not None and ckpt_path.exists():
        resume_from, resume_meta = resume_point(ckpt_path, fingerprint)
    return run_loop(
        net, train, validation, opts, choice, fingerprint, resume_meta, ckpt_path, resume_from,
        refit,
    )  # fmt: skip


def run_loop(
    net: PIMAModule,
    train: MultimodalData,
    validation: MultimodalData | None,
    opts: FitOptions,
    hardware_choice: tuple[str, int | list[int] | str],
    fingerprint: dict[str, Any],
    resume_meta: dict[str, Any] | None,
    ckpt_path: Path | None,
    resume_from: Path | None = None,
    refit: bool = False,
) -> History:
    """Steps 1-4 of the schedule: the EM start (unless resuming), then the Trainer."""
    responsibilities, em_log_likelihood = None, None
    if resume_meta is None:
        responsibilities, em_log_likelihood = start_from_physics(
            net, train, opts.seed, opts.em_starts, opts.prune_clusters, refit
        )
        schedule = make_schedule(
            opts.epochs, opts.warmup_epochs, opts.anchor_epochs, responsibilities is not None
        )
        if schedule.warmup_epochs > 0:
            reset_mixture_for_warmup(net)
    else:
        schedule = Schedule(opts.epochs, resume_meta["warmup_epochs"], resume_meta["anchor_epochs"])
        em_log_likelihood = resume_meta.get("em_log_likelihood")
        if net.physics_names:  # a placeholder: the checkpoint holds the EM responsibilities
            responsibilities = torch.zeros(train.n_samples, net.n_clusters, dtype=torch.float64)
    loop = loop_options(opts)
    net.train()  # a refit starts from a module a previous fit left in eval mode
    plan = PIMATrainingPlan(
        net, train, schedule, loop, responsibilities, validation, opts.on_step, opts.callback
    )
    metadata = CheckpointMetadata(fingerprint, schedule, em_log_likelihood)
    with quiet_lightning(opts.verbose):
        trainer = make_trainer(
            opts, schedule, hardware_choice, ckpt_path, metadata, validation is not None
        )
        start = None if resume_from is None else str(resume_from)
        trainer.fit(plan, ckpt_path=start, weights_only=True)
    history = plan.history(em_log_likelihood)
    net.eval()
    if history.loss:
        warn_collapsed_encoders(net, train.to_batch(device=net.mixture.loc.device))
    forget_registered_parameters()
    return history
