r"""The one training loop: a Lightning ``LightningModule`` over a :class:`PIMAModule`.

:class:`PIMATrainingPlan` holds the generative story's module (``net``), the whole data set on
the device and the schedule of DESIGN section 8; Lightning's ``Trainer`` runs it on one process
or many (``strategy="ddp"``), checkpoints it and resumes it. What a step does:

1. the loader yields a *global* batch of sample indices (a slice of a permutation seeded by
   ``(seed, epoch)``; no per-sample collate);
2. the random modality subsets and the standard-normal draws of ``z`` are drawn for the global
   batch from a generator seeded by ``(seed, epoch, step)`` (common random numbers), and rank
   ``r`` of ``W`` processes keeps slice ``r``; so ``W`` processes of ``B`` samples take the step
   one process takes on ``W * B`` samples, up to floating-point summation order, and a resumed
   run draws what an uninterrupted one draws;
3. ``-ELBO / N`` (Pyro's ``TraceEnum_ELBO``, its JIT variant, or the closed form), a backward
   pass (gradients averaged over processes by DDP), clipping, and an Adam step of the current
   phase's optimizer.

Each phase (warm-up, anchor, full) has its own Adam over the parameters it trains, so a phase
starts with fresh moments, and the parameters it holds fixed are never stepped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
import pyro
import torch

from pima_pyro.data import Batch, MultimodalData
from pima_pyro.inference.closed_form import closed_form_loss
from pima_pyro.inference.cross_modal import cross_modal_loss, has_cross_modal_term
from pima_pyro.inference.joint_moves import joint_split_and_merge, place_mixture_on_embeddings
from pima_pyro.inference.posterior import cluster_log_posterior
from pima_pyro.inference.svi import (
    PHASES,
    History,
    NonFiniteELBOError,
    describe_nonfinite,
    frozen_parameters,
    minibatch,
    per_sample_loss,
    validation_loss,
)
from pima_pyro.metrics import matched_accuracy
from pima_pyro.models.module import PIMAModule


@dataclass(frozen=True)
class Schedule:
    """Epoch counts of the phases: ``warmup`` then ``anchor`` then ``full`` up to ``epochs``."""

    epochs: int
    warmup_epochs: int
    anchor_epochs: int

    def phase_of(self, epoch: int) -> str:
        if epoch < self.warmup_epochs:
            return "warmup"
        return "anchor" if epoch < self.warmup_epochs + self.anchor_epochs else "full"

    def lr_factor(self, epoch: int, final: float) -> float:
        """The learning rate of ``epoch`` over the base rate: 1 until the full phase, then a
        half cosine that reaches ``final`` at the last epoch."""
        start = self.warmup_epochs + self.anchor_epochs
        if epoch <= start or self.epochs - 1 <= start:
            return 1.0
        progress = min(1.0, (epoch - start) / (self.epochs - 1 - start))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def ramp_factor(self, epoch: int, fraction: float) -> float:
        """``min(1, (epoch + 1) / max(1, fraction * epochs))``: a weight that rises linearly over
        the first ``fraction`` of the epochs, from epoch 0 on; 1 throughout when
        ``fraction * epochs <= 1`` (``fraction=0``: no ramp)."""
        return min(1.0, (epoch + 1) / max(1.0, fraction * self.epochs))


@dataclass(frozen=True)
class LoopOptions:
    """What a step does, apart from the schedule."""

    batch_size: int
    lr: float
    seed: int
    objective: str = "elbo"
    jit: bool = False
    subset_training: bool = True
    clip_norm: float | None = 100.0
    num_threads: int | None = None
    cross_modal_weight: float = 1.0
    joint_moves: int = 3
    lr_decay: float = 0.1
    self_training_weight: float = 1.0
    self_training_ramp: float = 0.5


def epoch_seed(seed: int, epoch: int, step: int = -1) -> int:
    """Seed of the permutation (``step=-1``) or of a step's draws: distinct per triple, and
    inside a generator's 64-bit range for every seed below 2**32."""
    return ((seed * 1_000_003 + epoch) * 100_003 + step + 1) % 2**63


class StepNumbers:
    """The loader: ``0 .. n_batches - 1`` per epoch. The plan turns step ``s`` into the index
    tensor of the epoch's ``s``-th global batch (a slice of the epoch's permutation, on the
    device; no per-sample collate). Lightning iterates it as any iterable
    (``use_distributed_sampler=False``); every process steps through the same global batches
    and keeps its rank's slice. The permutation is made in ``on_train_epoch_start``, where the
    epoch number is right also after a resume."""

    def __init__(self, plan: PIMATrainingPlan) -> None:
        self.plan = plan

    def __len__(self) -> int:
        return self.plan.n_batches

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.plan.n_batches))


class PIMATrainingPlan(pl.LightningModule):
    """Trains ``net`` on ``data`` (see the module docstring); ``validation`` data, when given,
    is scored each epoch (``val_loss``: -ELBO per sample; ``val_accuracy`` when it has labels).

    ``responsibilities`` (N, K) are the physics EM's, used for the mixture start after a
    warm-up. ``on_step(epoch, step)`` runs after every optimizer step and ``on_epoch(epoch,
    loss)`` after every epoch (instrumentation; neither may draw random numbers).
    """

    def __init__(
        self,
        net: PIMAModule,
        data: MultimodalData,
        schedule: Schedule,
        options: LoopOptions,
        responsibilities: torch.Tensor | None = None,
        validation: MultimodalData | None = None,
        on_step: Callable[[int, int], None] | None = None,
        on_epoch: Callable[[int, float], None] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.data, self.validation = data, validation
        self.schedule, self.options = schedule, options
        self.on_step, self.on_epoch = on_step, on_epoch
        self.frozen = frozen_parameters(net, physics_started=responsibilities is not None)
        # state that must survive a checkpoint and the return from spawned processes
        epochs = schedule.epochs
        self.register_buffer("history_loss", torch.full((epochs,), math.nan, dtype=torch.float64))
        self.register_buffer("history_phase", torch.full((epochs,), -1, dtype=torch.long))
        self.register_buffer("history_seconds", torch.zeros(epochs, dtype=torch.float64))
        if responsibilities is not None:
            self.register_buffer("responsibilities", responsibilities.to(torch.float64))
        else:
            self.responsibilities = None
        self.full: Batch | None = None
        self._trainable: dict[str, list[torch.nn.Parameter]] = {}
        self._objective: Callable[[Batch], torch.Tensor] | None = None

    # ---- data --------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def global_batch_size(self) -> int:
        return min(self.options.batch_size * self.world_size, self.data.n_samples)

    @property
    def n_batches(self) -> int:
        n, size = self.data.n_samples, self.global_batch_size
        # JIT bakes the batch shape in and DDP needs equal shares: both drop the last partial
        # batch (a different random remainder every epoch)
        drop_last = self.options.jit or self.world_size > 1
        return n // size if drop_last else math.ceil(n / size)

    def epoch_index_batches(self, epoch: int) -> list[torch.Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(epoch_seed(self.options.seed, epoch))
        perm = torch.randperm(self.data.n_samples, device=self.device, generator=gen)
        size = self.global_batch_size
        return [perm[b * size : (b + 1) * size] for b in range(self.n_batches)]

    def rank_batch(self, idx: torch.Tensor, epoch: int, step: int) -> Batch:
        """This rank's share of the global batch ``idx``, with the step's random draws."""
        assert self.full is not None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(epoch_seed(self.options.seed, epoch, step))
        batch = minibatch(self.full, idx, self.options.subset_training, gen, self.net.latent_dim)
        world = self.world_size
        if world == 1:
            return batch
        share = idx.shape[0] // world
        return batch.take(slice(self.global_rank * share, (self.global_rank + 1) * share))

    def train_dataloader(self) -> StepNumbers:
        return StepNumbers(self)

    def val_dataloader(self) -> range:
        return range(1)  # one step over the whole validation set

    # ---- Lightning hooks ---------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam per phase, over the parameters that phase trains."""
        return [torch.optim.Adam(self.trainable(phase), lr=self.options.lr) for phase in PHASES]

    def trainable(self, phase: str) -> list[torch.nn.Parameter]:
        if phase not in self._trainable:  # listed once: a step must not walk the module tree
            frozen = self.frozen[phase]
            named = self.net.named_parameters()
            self._trainable[phase] = [p for name, p in named if not name.startswith(frozen)]
        return self._trainable[phase]

    def on_fit_start(self) -> None:
        if self.options.num_threads is not None:  # spawned processes start with torch's default
            torch.set_num_threads(self.options.num_threads)
        dtype = self.net.mixture.loc.dtype
        self.full = self.data.to_batch(device=self.device, dtype=dtype)
        self.validation_batch = (
            None if self.validation is None else self.validation.to_batch(self.device, dtype)
        )
        if self.options.objective == "elbo":
            self._objective = per_sample_loss(self.net, self.full.n_total, self.options.jit)
        else:
            self._objective = self._closed_form
        # inputs are validated once by MultimodalData; per-step argument checks would cost a
        # host sync each and turn a NaN into a ValueError deep inside torch instead of the
        # diagnosed NonFiniteELBOError
        self._validation = pyro.validation_enabled(False)
        self._validation.__enter__()

    def on_fit_end(self) -> None:
        self._validation.__exit__(None, None, None)

    def on_exception(self, exception: BaseException) -> None:
        if hasattr(self, "_validation"):
            self._validation.__exit__(None, None, None)

    def _closed_form(self, batch: Batch) -> torch.Tensor:
        return closed_form_loss(self.net, batch)

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if epoch == self.schedule.warmup_epochs and epoch > 0:
            self.start_mixture_from_embeddings()
        anchor_end = self.schedule.warmup_epochs + self.schedule.anchor_epochs
        if epoch == anchor_end and self.schedule.anchor_epochs > 0 and self.options.joint_moves:
            assert self.full is not None
            joint_split_and_merge(
                self.net,
                self.full,
                self.options.seed,
                rounds=self.options.joint_moves,
            )
        lr = self.options.lr * self.schedule.lr_factor(epoch, self.options.lr_decay)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self._epoch_batches = self.epoch_index_batches(epoch)
        self._snapshot = self.snapshot()
        self._epoch_start = time.perf_counter()
        self._epoch_total = torch.zeros((), device=self.device, dtype=torch.float64)
        # the first non-finite step, tracked on the device: no host sync inside the epoch
        self._first_bad = torch.full((), -1, device=self.device, dtype=torch.long)

    def training_step(self, step: int, batch_idx: int) -> None:
        epoch = self.current_epoch
        idx = self._epoch_batches[step]
        phase = self.schedule.phase_of(epoch)
        optimizer = self.optimizers()[PHASES.index(phase)]
        objective, loss = self.step_objective(self.rank_batch(idx, epoch, step))
        self.net.zero_grad(set_to_none=True)
        self.manual_backward(objective)
        self.clip_gradients_of(phase)
        optimizer.step()
        loss = loss.detach()
        bad_now = (~torch.isfinite(objective.detach())) & (self._first_bad < 0)
        self._first_bad = torch.where(
            bad_now, torch.full_like(self._first_bad, step), self._first_bad
        )
        self._epoch_total = self._epoch_total + loss
        if self.on_step is not None:
            self.on_step(epoch, step)

    def step_objective(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objective, loss)``: what a step minimises, and its -ELBO per sample (logged).
        The objective adds the cross-modal cluster term with its weights and ramp
        (:mod:`~pima_pyro.inference.cross_modal`), whose gradient reaches the encoders only."""
        assert self._objective is not None
        loss = self._objective(batch)
        weights = self.cross_modal_weights()
        if weights is None:
            return loss, loss
        return loss + cross_modal_loss(self.net, batch, *weights), loss

    def cross_modal_weights(self) -> tuple[float, float, float] | None:
        """The cross-modal term's weights this epoch: paired, self-training and the exponent of
        the data modalities' evidence in the paired target, the last two ramped in by
        ``self_training_ramp``; ``None`` when the term is absent (both weights 0, or no physics
        or no data modality)."""
        options = self.options
        if (options.cross_modal_weight, options.self_training_weight) == (0.0, 0.0):
            return None
        if not has_cross_modal_term(self.net):
            return None
        ramp = self.schedule.ramp_factor(self.current_epoch, options.self_training_ramp)
        return options.cross_modal_weight, options.self_training_weight * ramp, ramp

    def clip_gradients_of(self, phase: str) -> None:
        if self.options.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable(phase), self.options.clip_norm)

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch
        reduce = self.trainer.strategy.reduce
        total = reduce(self._epoch_total, reduce_op="mean")
        # the first bad step over ranks: the smallest non-negative one
        never = float(self.n_batches)
        bad = torch.where(self._first_bad >= 0, self._first_bad.double(), torch.full((), never))
        first_bad = reduce(bad.to(self.device), reduce_op="min")
        first_bad = -1 if float(first_bad) >= never else first_bad
        value = float(total) / self.n_batches  # one host sync per epoch
        if first_bad >= 0 or not math.isfinite(value):
            self.refuse_non_finite(epoch, int(first_bad))
        seconds = time.perf_counter() - self._epoch_start
        phase = self.schedule.phase_of(epoch)
        self.history_loss[epoch] = value
        self.history_phase[epoch] = PHASES.index(phase)
        self.history_seconds[epoch] = seconds
        # already reduced over processes: no sync_dist; the bar shows loss and phase
        self.log_dict({"train_loss": value, "epoch_seconds": seconds}, prog_bar=False)
        self.log("phase", float(PHASES.index(phase)), prog_bar=True)
        self.log("loss", value, prog_bar=True, logger=False)
        if self.on_epoch is not None:
            self.on_epoch(epoch, value)

    # ---- validation --------------------------------------------------------------------------
    def validation_step(self, step: int, batch_idx: int) -> None:
        assert self.validation is not None and self.validation_batch is not None
        batch = self.validation_batch  # on the device once per fit; the noise is drawn here
        gen = torch.Generator(device=self.device).manual_seed(self.options.seed)
        batch.noise = torch.randn(
            batch.size,
            self.net.latent_dim,
            generator=gen,
            device=self.device,
            dtype=self.net.mixture.loc.dtype,
        )
        if self.options.objective == "closed_form":  # early stopping watches the trained bound
            with torch.no_grad():
                loss = float(closed_form_loss(self.net, batch))
        else:
            loss = validation_loss(self.net, batch)
        metrics = {"val_loss": float(loss)}
        if self.validation.labels is not None:
            names = self.net.modality_names
            log_post = cluster_log_posterior(self.net, batch, names, 64, gen)
            accuracy, _ = matched_accuracy(
                self.validation.labels.numpy(), log_post.argmax(1).cpu().numpy()
            )
            metrics["val_accuracy"] = accuracy
        self.log_dict(metrics, prog_bar=True, batch_size=batch.size)

    # ---- mixture start, snapshots, the non-finite diagnosis ----------------------------------
    @torch.no_grad()
    def start_mixture_from_embeddings(self) -> None:
        """Step 3: mu_c, sigma_c from the warmed-up embeddings weighted by the EM
        responsibilities (a GMM on the embeddings when there were none)."""
        assert self.full is not None
        place_mixture_on_embeddings(
            self.net, self.full, self.responsibilities, seed=self.options.seed
        )

    def snapshot(self) -> dict:
        return {
            "net": copy.deepcopy(self.net.state_dict()),
            "optimizers": [copy.deepcopy(o.state_dict()) for o in self.trainer.optimizers],
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, snapshot: dict) -> None:
        self.net.load_state_dict(snapshot["net"])
        for optimizer, state in zip(self.trainer.optimizers, snapshot["optimizers"], strict=True):
            optimizer.load_state_dict(copy.deepcopy(state))
        torch.set_rng_state(snapshot["torch_rng"])

    def refuse_non_finite(self, epoch: int, bad_step: int) -> None:
        """Restore the epoch's start, replay it up to ``bad_step`` to name what went
        non-finite (one process only: a replay without the other ranks would diverge) and
        raise :class:`NonFiniteELBOError`; nothing non-finite is kept or checkpointed."""
        phase = self.schedule.phase_of(epoch)
        self.restore(self._snapshot)
        cause = "not replayed under data-parallel training"
        if bad_step < 0:
            cause = "unknown"
        elif self.world_size == 1:
            cause = self.replay_until(epoch, bad_step)
            self.restore(self._snapshot)
        raise NonFiniteELBOError(
            f"fit: the training objective became non-finite at epoch {epoch}, step "
            f"{bad_step} ({phase} phase): {cause}. The parameters from the start of epoch "
            f"{epoch} (the last good state) were restored; the last checkpoint written holds "
            "the last good state saved before it."
        )

    def describe_step(self, batch: Batch) -> str:
        """The ELBO's diagnosis, and whether the cross-modal term was finite."""
        cause = describe_nonfinite(self.net, batch)
        weights = self.cross_modal_weights()
        if weights is not None:
            with torch.no_grad():
                finite = bool(torch.isfinite(cross_modal_loss(self.net, batch, *weights)))
            cause += f"; cross-modal term {'finite' if finite else 'NON-FINITE'}"
        return cause

    def replay_until(self, epoch: int, bad_step: int) -> str:
        optimizer = self.trainer.optimizers[PHASES.index(self.schedule.phase_of(epoch))]
        for step, idx in enumerate(self.epoch_index_batches(epoch)):
            batch = self.rank_batch(idx, epoch, step)
            if step == bad_step:
                return self.describe_step(batch)
            objective, _ = self.step_objective(batch)
            self.net.zero_grad(set_to_none=True)
            objective.backward()
            self.clip_gradients_of(self.schedule.phase_of(epoch))
            optimizer.step()
            if self.on_step is not None:
                self.on_step(epoch, step)
        return "the replay did not reproduce it (non-deterministic kernels?)"

    def history(self, em_log_likelihood: float | None = None) -> History:
        """The per-epoch record of the completed epochs (the logged ``train_loss``)."""
        done = (self.history_phase >= 0).nonzero().flatten().tolist()
        return History(
            loss=[float(self.history_loss[e]) for e in done],
            phase=[PHASES[int(self.history_phase[e])] for e in done],
            seconds=[float(self.history_seconds[e]) for e in done],
            em_log_likelihood=em_log_likelihood,
        )
