"""The physics mixture gated by the other modalities (issue 13, missing curves): the gate's
regression against its optimality conditions, the held-out property, and a partition that
only the other modalities can find."""

from __future__ import annotations

import numpy as np
import torch

from pima_pyro import LinearThroughOrigin
from pima_pyro.inference.gated_em import (
    fit_gate,
    gated_split_and_merge,
    held_out_log_gate,
    with_intercept,
)
from pima_pyro.inference.initialization import (
    em_from_responsibilities,
    em_problem,
    physics_mixture_em,
)
from pima_pyro.metrics import matched_accuracy


def _soft_labels(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 3, generator=g, dtype=torch.float64)
    logits = features @ torch.randn(3, k, generator=g, dtype=torch.float64)
    return features, torch.softmax(logits + torch.randn(n, k, generator=g).double(), 1)


def test_gate_solves_its_penalised_likelihood():
    """At the optimum the gradient X~^T (softmax(X~ W) - R) / N + 2 lambda [W_1:F; 0] is 0;
    with a huge penalty only the intercepts remain, so the gate is the mean of R."""
    features, resp = _soft_labels(200, 4, 0)
    weights = fit_gate(features, resp, l2=0.1)
    design = with_intercept(features)
    penalty = torch.cat([weights[:-1], torch.zeros_like(weights[-1:])])
    grad = design.T @ (torch.softmax(design @ weights, 1) - resp) / 200 + 0.2 * penalty
    assert grad.abs().max() < 1e-5
    warm = fit_gate(features, resp, l2=0.1, start=weights, max_iter=2)
    torch.testing.assert_close(warm, weights, atol=1e-6, rtol=0)  # a warm start stays there
    flat = fit_gate(features, resp, l2=1e4)
    gate = torch.softmax(design @ flat, 1)
    np.testing.assert_allclose(gate.numpy(), resp.mean(0).expand(200, -1).numpy(), atol=1e-3)


def test_a_sample_gate_never_sees_its_own_label():
    features, resp = _soft_labels(100, 3, 1)
    active = torch.ones(3, dtype=torch.bool)
    before, _ = held_out_log_gate(features, resp, active, seed=0)
    flipped = resp.clone()
    flipped[7] = resp[7].flip(0)
    after, _ = held_out_log_gate(features, flipped, active, seed=0)
    assert torch.equal(before[7], after[7])  # row 7's own fold never trains its gate
    assert (before - after).abs().max() > 1e-3  # the other folds' gates do see it
    np.testing.assert_allclose(before.exp().sum(1).numpy(), 1.0, rtol=1e-9)
    some_off = torch.tensor([True, False, True])
    log_gate, fold_weights = held_out_log_gate(features, resp, some_off, seed=0)
    assert log_gate[:, 1].exp().max() < 1e-100
    assert len(fold_weights) == 5 and all(w.shape == (4, 3) for w in fold_weights)
    assert all(float(w[:, 1].abs().max()) == 0.0 for w in fold_weights)  # not fitted


def _two_laws_three_groups(seed: int, gap: float = 0.3) -> tuple[dict, torch.Tensor, np.ndarray]:
    """Groups 0 and 1 follow close lines (slopes 1.0 and 1.0 + ``gap``; 0.3 is one noise sd
    of a curve's own slope): the curves alone confuse them, a second modality does not
    (features centred at -3 and +3). Group 2: slope 3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(60)
    t = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)
    slopes = torch.tensor([1.0, 1.0 + gap, 3.0], dtype=torch.float64)
    y = slopes[labels, None] * t + 0.3 * torch.randn(180, 10, generator=g).double()
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    features = centres[labels] + torch.randn(180, 2, generator=g).double()
    mask = torch.ones(180, dtype=torch.bool)
    expert = LinearThroughOrigin().bind(3)
    args = {"curves": {"y": y}, "masks": {"y": mask}, "experts": {"y": expert}, "grids": {"y": t}}
    return args, features, labels.numpy()


def test_gated_moves_find_the_groups_only_the_other_modality_separates():
    """Physics EM confuses the two close lines (accuracy <= 0.85); the gated
    mixture, its score the curves' likelihood given the features, finds all three groups."""
    args, features, labels = _two_laws_three_groups(0)
    physics = physics_mixture_em(**args, n_clusters=3, seed=0, gate=False)
    alone = matched_accuracy(labels, physics.responsibilities.argmax(1).numpy())[0]
    assert alone <= 0.85
    data = em_problem(args["curves"], args["masks"], args["experts"], args["grids"])
    gated = gated_split_and_merge(physics, data, features.numpy(), features.numpy(), seed=0)
    assert matched_accuracy(labels, gated.responsibilities.argmax(1).numpy())[0] >= 0.97
    slopes = np.sort(gated.theta["y"].flatten().numpy())
    np.testing.assert_allclose(slopes, [1.0, 1.3, 3.0], atol=0.05)
    np.testing.assert_allclose(gated.weights.sum().item(), 1.0)


def test_moves_repair_a_random_cut_and_a_merge_that_gated_em_keeps():
    """The hidden-curves failure in miniature: one group cut at random into clusters 0 and 1,
    two close lines (slopes 2.0 and 2.4) merged in cluster 2. Gated EM alone keeps it (the
    two halves share one law); the moves (merge 0 and 1, split 2 by the features) repair it."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(3).repeat_interleave(60)
    t = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)
    slopes = torch.tensor([1.0, 2.0, 2.4], dtype=torch.float64)
    y = slopes[labels, None] * t + 0.3 * torch.randn(180, 10, generator=g).double()
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    features = (centres[labels] + torch.randn(180, 2, generator=g).double()).numpy()
    mask = torch.ones(180, dtype=torch.bool)
    data = em_problem({"y": y}, {"y": mask}, {"y": LinearThroughOrigin().bind(3)}, {"y": t})
    wrong = torch.tensor([0, 1] * 30 + [2] * 120)
    start = em_from_responsibilities(
        torch.nn.functional.one_hot(wrong, 3).double(), data, torch.ones(3, dtype=torch.bool), 1
    )
    kept = gated_split_and_merge(start, data, features, features, seed=0, max_rounds=0)
    assert matched_accuracy(labels.numpy(), kept.responsibilities.argmax(1).numpy())[0] <= 0.7
    moved = gated_split_and_merge(start, data, features, features, seed=0)
    assert matched_accuracy(labels.numpy(), moved.responsibilities.argmax(1).numpy())[0] >= 0.97
    assert moved.log_likelihood > kept.log_likelihood
    np.testing.assert_allclose(np.sort(moved.theta["y"].flatten().numpy()), slopes, atol=0.1)


def test_the_gated_start_with_hidden_curves_and_a_subsample_recovers_the_laws():
    """End to end through ``physics_mixture_em``: a third of the curves hidden, the search on a
    subsample of the rest (``start_rows``). The laws come from the gated stage (within 0.02;
    on this set EM on the curves alone ends at 0.94 for the slope 1.0); a sample without a
    curve gets the weights as its responsibilities (its E-step)."""
    args, features, labels = _two_laws_three_groups(0)
    hidden = torch.as_tensor(np.arange(180) % 3 == 0)
    args["masks"] = {"y": ~hidden}
    em = physics_mixture_em(
        **args, n_clusters=3, seed=0, start_features=features.numpy(), start_rows=100
    )
    slopes = em.theta["y"].flatten().sort().values
    np.testing.assert_allclose(slopes.numpy(), [1.0, 1.3, 3.0], atol=0.02)
    np.testing.assert_allclose(em.weights.sum().item(), 1.0)
    torch.testing.assert_close(em.responsibilities[hidden], em.weights.expand(60, -1))


def test_pruning_by_the_gated_score_empties_a_copy_but_keeps_laws_the_features_separate():
    """Three groups, K = 4, two lines only half a noise sd of a curve's slope apart (1.0 and
    1.15). BIC on the curves alone merges them (two active); BIC on the curves given the
    features keeps both, each with its law and a third of the samples, and leaves the
    surplus at weight exactly 0."""
    for seed in (1, 2):
        args, features, labels = _two_laws_three_groups(seed, gap=0.15)
        start = {"n_clusters": 4, "seed": 0, "start_features": features.numpy(), "prune": True}
        assert physics_mixture_em(**args, **start, gate=False).n_active == 2
        em = physics_mixture_em(**args, **start)
        assert em.n_active == 3 and float(em.weights[~em.active].abs().max()) == 0.0
        slopes = np.sort(em.theta["y"][em.active].flatten().numpy())
        np.testing.assert_allclose(slopes, [1.0, 1.15, 3.0], atol=0.05)
        np.testing.assert_allclose(em.weights[em.active].numpy(), 1 / 3, atol=0.03)
