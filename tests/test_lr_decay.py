"""The learning-rate schedule of the full phase: a half cosine from ``lr`` to ``lr * lr_decay``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.training_plan import Schedule


def test_lr_factor_is_one_until_the_full_phase_then_a_half_cosine_to_the_final_factor():
    schedule = Schedule(epochs=11, warmup_epochs=0, anchor_epochs=3)
    factors = [schedule.lr_factor(e, 0.1) for e in range(11)]
    assert factors[:4] == [1.0] * 4  # anchor, and the first full epoch
    assert factors[-1] == pytest.approx(0.1, abs=1e-12)
    progress = (7 - 3) / (10 - 3)
    assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert all(a > b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert [schedule.lr_factor(e, 1.0) for e in range(11)] == [1.0] * 11


class StepSizes:
    """``on_step`` hook: mean absolute change of one weight tensor per step, per epoch."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.last = weight, weight.detach().clone()
        self.sizes: dict[int, list[float]] = {}

    def __call__(self, epoch: int, step: int) -> None:
        change = float((self.weight.detach() - self.last).abs().mean())
        self.sizes.setdefault(epoch, []).append(change)
        self.last = self.weight.detach().clone()


def _step_sizes(lr_decay: float) -> dict[int, float]:
    """Mean absolute change per step of the image decoder's weights, per epoch."""
    torch.set_num_threads(1)
    data = digits_affine(seed=0).subset(np.arange(128))
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=2)
    torch.manual_seed(0)
    model.build(data)
    assert model.module is not None
    hook = StepSizes(next(model.module.modalities["image"].parameters()))
    model.fit(data, epochs=8, anchor_epochs=2, batch_size=32, seed=0, progress=False,
              lr_decay=lr_decay, on_step=hook, logger=False, joint_moves=0)  # fmt: skip
    return {epoch: float(np.mean(v)) for epoch, v in hook.sizes.items()}


def test_the_optimiser_takes_the_decayed_step_in_the_last_epoch():
    decayed, constant = _step_sizes(1e-3), _step_sizes(1.0)
    # Adam's step is about lr per parameter: the last epoch's steps shrink by about 1000
    assert decayed[7] < 0.01 * decayed[2]
    assert decayed[2] == pytest.approx(constant[2], rel=1e-6)  # same until the full phase
    assert constant[7] > 0.1 * constant[2]


def test_lr_decay_outside_0_1_is_refused_naming_it():
    data = digits_affine(seed=0).subset(np.arange(32))
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=2)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="lr_decay"):
            model.fit(data, epochs=1, lr_decay=bad, progress=False)
    with pytest.raises(TypeError, match="lr_decay"):
        model.fit(data, epochs=1, lr_decay="0.1", progress=False)
