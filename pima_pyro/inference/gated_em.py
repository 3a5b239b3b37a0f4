r"""The physics mixture gated by the other modalities: a start that sees the images.

Physics EM (:func:`~pima_pyro.inference.initialization.physics_mixture_em`) weighs each
sample's clusters by :math:`\pi_c` alone. Where physics laws are close and curves are few, its
best partition can be wrong by a few nats: with half the curves hidden (ten decays, 315 curves,
seeds 2 and 3) it split one digit's cluster at random and shared another digit between two
neighbours, 1.7 and 2.5 nats of physics log-likelihood above the true partition. A random split
is exactly what the other modalities cannot predict.

The gated mixture (a mixture of experts, Jordan & Jacobs, 1994) replaces :math:`\pi_c` by
:math:`g_c(x_n)`, a multinomial logistic regression on the data modalities' summaries
:math:`x_n` (:func:`~pima_pyro.inference.initialization.summary_features`):

.. math::

    r_{nc} \propto g_c(x_n)\, p(y_n \mid c), \qquad
    \text{score} = \sum_n \log \sum_c g_c(x_n)\, p(y_n \mid c),

the conditional log-likelihood of the curves given the other modalities. The gate of each
sample is **held out** (fitted on the other folds): a gate fitted on a sample's own row would
learn part of a random split by heart. Where the other modalities say nothing about the
cluster, the gate learns :math:`\pi` and the score is the physics log-likelihood.

:func:`gated_split_and_merge` runs this EM from physics EM's winner and tries the same
split-and-merge moves as physics EM, judged by the score.
:func:`~pima_pyro.inference.initialization.physics_mixture_em` returns its parameters with the
E-step (weights pi) on every sample and runs no EM on the curves alone after it: that drifted
back to the weights the curves prefer. On the seeds above the moves reached the partition EM
from the true labels reaches (0.968 and 0.980 of the curves' samples in the right cluster
under the gated mixture; 0.84 under physics EM).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pima_pyro.inference.initialization import (
    EMResult,
    _EMData,
    bic_cluster_penalty,
    em_from_responsibilities,
    merge_and_split,
    physics_log_likelihood,
    posterior_and_total,
    remove_while_bic_falls,
    resplit_pair,
    split_merge_candidates,
)
from pima_pyro.models.mixture import cluster_log_posterior_from_joint, restrict_to_active

#: Folds of the held-out gate.
GATE_FOLDS: int = 5
#: L2 penalty on the gate's weights (not its intercepts), per sample.
GATE_L2: float = 1e-2
#: L-BFGS iterations of a gate fit from 0.
COLD_GATE_STEPS: int = 100
#: L-BFGS iterations of a gate fit started from the previous EM iteration's gate: each EM
#: iteration then improves the gate (a generalised EM) instead of solving it afresh, which on
#: a few rows per cluster took 60-100 iterations every time.
WARM_GATE_STEPS: int = 20


def fit_gate(
    features: torch.Tensor,
    resp: torch.Tensor,
    l2: float = GATE_L2,
    start: torch.Tensor | None = None,
    max_iter: int | None = None,
) -> torch.Tensor:
    r"""Weights (F + 1, K) of the multinomial logistic regression of soft labels ``resp``
    (N, K) on ``features`` (N, F), last row the intercepts: the minimiser of
    :math:`-\frac1N \sum_{n,c} r_{nc} \log \operatorname{softmax}(\tilde x_n W)_c
    + \lambda \lVert W_{1:F} \rVert^2` (convex; at most ``max_iter`` L-BFGS iterations,
    default :data:`COLD_GATE_STEPS`, from ``start``, else from 0)."""
    design = with_intercept(features)
    shape = (design.shape[1], resp.shape[1])
    begin = torch.zeros(shape, dtype=design.dtype, device=design.device) if start is None else start
    weights = begin.clone().requires_grad_(True)
    steps = max_iter or COLD_GATE_STEPS
    optimizer = torch.optim.LBFGS([weights], max_iter=steps, line_search_fn="strong_wolfe")
    n = float(design.shape[0])

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        fit = -(resp * cluster_log_posterior_from_joint(design @ weights)).sum() / n
        loss = fit + l2 * weights[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weights.detach()


def with_intercept(features: torch.Tensor) -> torch.Tensor:
    """``features`` (N, F) with a column of ones appended."""
    return torch.cat([features, torch.ones_like(features[:, :1])], 1)


def held_out_log_gate(
    features: torch.Tensor,
    resp: torch.Tensor,
    active: torch.Tensor,
    seed: int,
    starts: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r""":math:`\log g_c(x_n)` (N, K), each row from a gate fitted on the other
    :data:`GATE_FOLDS` - 1 folds (a seeded random split), and the folds' weights (F + 1, K).
    Only the active clusters are fitted (an empty one would drive its intercept to minus
    infinity); inactive ones get the empty weight. ``starts``: the folds' weights to start
    from (the previous EM iteration's: the gate moves little between iterations)."""
    n = features.shape[0]
    order = torch.as_tensor(np.random.default_rng(seed).permutation(n), device=features.device)
    log_gate = torch.zeros_like(resp)
    design = with_intercept(features)
    fitted = []
    for fold in range(min(GATE_FOLDS, n)):
        held = order[fold::GATE_FOLDS]
        kept = torch.ones(n, dtype=torch.bool, device=features.device)
        kept[held] = False
        start = None if starts is None else starts[fold][:, active]
        weights = torch.zeros(
            design.shape[1], resp.shape[1], dtype=design.dtype, device=design.device
        )
        steps = COLD_GATE_STEPS if start is None else WARM_GATE_STEPS
        weights[:, active] = fit_gate(features[kept], resp[kept][:, active], GATE_L2, start, steps)
        log_gate[held] = design[held] @ weights
        fitted.append(weights)
    return cluster_log_posterior_from_joint(restrict_to_active(log_gate, active)), fitted


@dataclass
class GatedFit:
    """A state of the gated EM: responsibilities (N, K), the physics M-step, the score and the
    folds' gate weights."""

    resp: torch.Tensor
    physics: EMResult
    score: float
    gate: list[torch.Tensor]

    @property
    def active(self) -> torch.Tensor:
        return self.physics.active

    @property
    def weights(self) -> torch.Tensor:
        """Unnormalised: the responsibilities' column sums."""
        return self.resp.sum(0)

    @property
    def log_likelihood(self) -> float:
        return self.score


def gated_em(
    data: _EMData,
    features: torch.Tensor,
    resp: torch.Tensor,
    active: torch.Tensor,
    seed: int,
    theta_start: dict[str, torch.Tensor] | None = None,
    max_iter: int = 15,
    tol: float = 1e-6,
    gate_start: list[torch.Tensor] | None = None,
) -> GatedFit:
    """EM of the gated mixture from ``resp`` on samples that all have a curve: the gate and
    the physics M-step from the responsibilities, then the E-step, until the score moves by
    less than ``tol`` (relative). ``gate_start``: the folds' gate weights to start from."""
    previous = -np.inf
    state: GatedFit | None = None
    for _ in range(max_iter):
        log_gate, gate_start = held_out_log_gate(features, resp, active, seed, gate_start)
        physics = em_from_responsibilities(resp, data, active, max_iter=1, theta_start=theta_start)
        theta_start = physics.theta
        noise2 = {name: s.square() for name, s in physics.noise_scale.items()}
        log_joint = log_gate + physics_log_likelihood(data, physics.theta, noise2)
        resp, score = posterior_and_total(data, log_joint)
        state = GatedFit(resp, physics, score, gate_start)
        if abs(score - previous) <= tol * abs(score):
            break
        previous = score
    assert state is not None
    return state


def _candidate_moves(
    resp: torch.Tensor, active: torch.Tensor, features: np.ndarray, n_candidates: int
) -> Iterator[torch.Tensor]:
    """The responsibilities each move starts from: physics EM's merge-and-split moves
    (:func:`~pima_pyro.inference.initialization.split_merge_candidates`), then the pairs
    that overlap most pooled and re-split by the features
    (:func:`~pima_pyro.inference.initialization.resplit_pair`), which physics EM has no
    reason to try: where two groups on close (not equal) laws are cut at random, the gate
    finds the cut the features make."""
    moves = split_merge_candidates(resp, active, features, n_candidates, n_candidates + 2)
    for i, j, k in moves:
        yield merge_and_split(resp, i, j, k, features)
    for i, j in dict.fromkeys((i, j) for i, j, _ in moves):
        yield resplit_pair(resp, i, j, features)


def gated_split_and_merge(
    result: EMResult,
    data: _EMData,
    features: np.ndarray,
    split_features: np.ndarray,
    seed: int,
    n_candidates: int = 3,
    max_rounds: int = 3,
    screen_iter: int = 4,
    prune: bool = False,
) -> EMResult:
    """Gated EM from ``result`` (physics EM on ``data``, whose samples all have a curve), then
    at most ``max_rounds`` rounds of split-and-merge moves
    (:func:`~pima_pyro.inference.initialization.split_merge_candidates`, splits by 2-means on
    ``split_features``): each move is screened by ``screen_iter`` gated EM iterations, and the
    first that beats the current score is run to convergence and kept.

    Returns the physics M-step of the kept state with the mixture weights
    :math:`\\frac1N \\sum_n r_{nc}` (its ``log_likelihood`` is the gated score). A held-out
    gate fitted to soft labels has no exact EM monotonicity: a move is kept only if its
    converged (or screened) score beats the current one. ``prune``: then
    :func:`prune_gated`."""
    gate_features = torch.as_tensor(features, dtype=torch.float64, device=result.weights.device)
    active = result.active
    state = gated_em(data, gate_features, result.responsibilities, active, seed, result.theta)
    for _ in range(max_rounds):
        improved = False
        for resp in _candidate_moves(state.resp, active, split_features, n_candidates):
            # a few physics EM iterations first let the two halves settle on their laws
            resp = em_from_responsibilities(resp, data, active, max_iter=3).responsibilities
            trial = gated_em(
                data, gate_features, resp, active, seed, max_iter=screen_iter, gate_start=state.gate
            )
            if trial.score > state.score + 1e-6 * abs(state.score):
                theta = trial.physics.theta
                done = gated_em(
                    data, gate_features, trial.resp, active, seed, theta, gate_start=trial.gate
                )
                # held-out gates make the EM not exactly monotone: keep the better state
                state = done if done.score >= trial.score else trial
                improved = True
                break
        if not improved:
            break
    if prune:
        state = prune_gated(state, data, gate_features, seed)
    active = state.active
    weights = (state.weights + 1e-8) * active  # EM's floor: no active cluster at 0
    return EMResult(
        weights=weights / weights.sum(),
        theta=state.physics.theta,
        noise_scale=state.physics.noise_scale,
        responsibilities=state.resp,
        log_likelihood=state.score,
        n_iter=0,  # EM iterations of the curves alone: none
        active=active.clone(),
    )


def prune_gated(
    state: GatedFit, data: _EMData, features: torch.Tensor, seed: int, max_tries: int = 3
) -> GatedFit:
    r"""Remove clusters while that lowers the Bayesian information criterion of the gated
    mixture (:func:`~pima_pyro.inference.initialization.remove_while_bic_falls`): a cluster
    stays only if it raises the score (the curves' log-likelihood given the features) by more
    than :func:`~pima_pyro.inference.initialization.bic_cluster_penalty` of its physics
    parameters and weight. The gate needs no penalty: its score is held out.

    A removal's members go where three physics EM iterations without the cluster put them,
    then gated EM runs. A copy of another cluster's law gains nothing under the gate
    (:math:`g_a p(y|a) + g_b p(y|b)` with equal laws), while two close laws the features tell
    apart keep what the gate adds, which the curves alone do not: ten decays, rates 2.7 and
    3.0 merged by BIC on the curves."""
    penalty = bic_cluster_penalty(data.params_per_cluster, int(data.any_observed.sum()))
    without = partial(_gated_without, data, features, seed)
    return remove_while_bic_falls(state, without, penalty, max_tries)


def _gated_without(
    data: _EMData, features: torch.Tensor, seed: int, state: GatedFit, active: torch.Tensor
) -> GatedFit:
    """Gated EM with the ``active`` clusters only, from three physics EM iterations."""
    physics = em_from_responsibilities(state.resp, data, active, max_iter=3)
    return gated_em(
        data, features, physics.responsibilities, active, seed, physics.theta, gate_start=state.gate
    )
