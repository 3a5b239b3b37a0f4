r"""A start that avoids the known GMM-VAE collapse (DESIGN section 8).

1. :func:`physics_mixture_em`: fit the physics modalities' mixture of experts alone by EM
   (the seed's Tutorial 2), from several starts, keeping the best log-likelihood:

   * E-step: :math:`r_{nc} \propto \pi_c \prod_m \mathcal N(y_{mn}; \Phi_m\theta_{mc}, s_{mc}^2 I)`
     (log space, unobserved modalities contribute nothing);
   * M-step: :math:`\pi_c = \tfrac1N\sum_n r_{nc}`, weighted least squares for
     :math:`\theta_{mc}` and the closed-form noise :math:`s_{mc}^2`
     (:func:`pima_pyro.models.experts.weighted_least_squares`); for experts that are not linear
     in theta, the same weighted least squares by L-BFGS from the previous iterate
     (:func:`pima_pyro.models.experts.fit_weighted_nonlinear`, a generalised EM step).

2. :func:`mixture_from_embeddings`: after a warm-up of the autoencoder, set
   :math:`\mu_c, \sigma_c` from the embeddings weighted by the step-1 responsibilities, or
   (no physics modality) from a diagonal GMM fitted to the embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
import torch

from pima_pyro.models.experts import (
    NOISE_SCALE_MIN,
    PhysicsExpert,
    cluster_log_likelihood,
    fit_weighted_nonlinear,
    least_squares_fit,
    weighted_least_squares,
)
from pima_pyro.models.mixture import (
    cluster_log_posterior_from_joint,
    log_weights_of,
    marginalize_clusters,
)


@dataclass
class EMResult:
    """Output of :func:`physics_mixture_em` (tensors on the input's device)."""

    weights: torch.Tensor  # (K,), exactly 0 where not active
    theta: dict[str, torch.Tensor]  # name -> (K, P)
    noise_scale: dict[str, torch.Tensor]  # name -> (K,)
    responsibilities: torch.Tensor  # (N, K)
    log_likelihood: float  # total, at the returned parameters
    n_iter: int
    active: torch.Tensor  # (K,) bool: clusters kept by the penalised-likelihood pruning

    @property
    def n_active(self) -> int:
        return int(self.active.sum())


@dataclass
class _EMData:
    """The inputs every EM run shares (float64, one device)."""

    y: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor]
    t: dict[str, torch.Tensor]
    experts: Mapping[str, PhysicsExpert]
    any_observed: torch.Tensor
    floors: dict[str, float]
    max_iter: int
    tol: float

    @property
    def params_per_cluster(self) -> int:
        """Free parameters of one cluster (:func:`physics_params_per_cluster`)."""
        return physics_params_per_cluster([self.experts[n] for n in self.y])


def physics_params_per_cluster(experts: Iterable[PhysicsExpert]) -> int:
    """Free parameters of one cluster of the physics mixture: theta and noise of every
    expert, and its weight."""
    return sum(expert.num_params + 1 for expert in experts) + 1


def _kmeans_plus_plus(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Hard assignments from k-means++ seeding followed by a few Lloyd iterations."""
    n = features.shape[0]
    centers = [features[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((features[:, None] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(features[rng.choice(n, p=probs)])
    centers_arr = np.array(centers)
    for _ in range(20):
        assign = ((features[:, None] - centers_arr[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if np.any(assign == j):
                centers_arr[j] = features[assign == j].mean(0)
    return assign


def per_curve_estimates(
    expert: PhysicsExpert, curves: torch.Tensor, t: torch.Tensor, steps: int = 30
) -> torch.Tensor:
    """Each curve's own least-squares theta (N, P), in the support's unconstrained coordinates.

    Linear experts: least squares. Others: the best start candidate per curve
    (:meth:`PhysicsExpert.initial_theta`) refined by :func:`least_squares_fit`.
    """
    start = expert.initial_theta(curves, t)  # linear experts: already the least-squares fit
    if expert.is_linear:
        return start
    ones = torch.ones(curves.shape[0], dtype=curves.dtype, device=curves.device)
    theta = least_squares_fit(expert, t, curves, ones, start, steps=steps)
    return expert.theta_transform.inv(theta)


def _start_features(data: _EMData) -> np.ndarray:
    """Per-curve parameter estimates of every physics modality, standardised: (N, F).

    Unobserved entries take the observed mean; robust scales (median absolute deviation) keep
    a few badly fitted curves from squeezing every other sample together."""
    columns = []
    for name, y in data.y.items():
        observed = data.m[name]
        feats = per_curve_estimates(data.experts[name], y, data.t[name])
        feats = torch.where(torch.isfinite(feats), feats, torch.zeros_like(feats))
        feats = torch.where(observed[:, None], feats, feats[observed].median(0).values)
        columns.append(feats)
    out = torch.cat(columns, dim=1).double().cpu().numpy()
    centred = out - np.median(out, axis=0)
    spread = np.median(np.abs(centred), axis=0) * 1.4826
    return np.clip(centred / (spread + 1e-12), -10.0, 10.0)


def em_problem(
    curves: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    experts: Mapping[str, PhysicsExpert],
    grids: Mapping[str, torch.Tensor],
    max_iter: int = 300,
    tol: float = 1e-7,
) -> _EMData:
    """The inputs every EM run on these curves shares (float64; experts that are not linear
    in theta take at most 50 iterations per run)."""
    device = next(iter(curves.values())).device
    y = {n: v.double() for n, v in curves.items()}
    m = {n: masks[n].to(device) for n in curves}
    if not all(e.is_linear for e in experts.values()):
        max_iter = min(max_iter, 50)
    return _EMData(
        y=y,
        m=m,
        t={n: grids[n].double().to(device) for n in curves},
        experts=experts,
        any_observed=torch.stack(list(m.values())).any(0),
        floors={n: max(NOISE_SCALE_MIN**2, 1e-6 * float(v[m[n]].var())) for n, v in y.items()},
        max_iter=max_iter,
        tol=tol,
    )


def physics_mixture_em(
    curves: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    experts: Mapping[str, PhysicsExpert],
    grids: Mapping[str, torch.Tensor],
    n_clusters: int,
    n_starts: int = 10,
    max_iter: int = 300,
    tol: float = 1e-7,
    seed: int = 0,
    split_merge: bool = True,
    prune: bool = False,
    start_features: np.ndarray | None = None,
    start_rows: int | None = 5000,
    gate: bool = True,
) -> EMResult:
    """EM for the mixture of physics experts (float64), in four stages:

    1. best of ``n_starts`` starts: one from quantiles of the first principal direction of the
       per-curve estimates (:func:`per_curve_estimates`), the others k-means++ on them;
    2. ``split_merge``: split-and-merge moves (:func:`split_and_merge`) while they raise the
       log-likelihood: two clusters on one physics law merge and a cluster holding two laws
       splits, which EM alone never does;
    3. ``gate`` (with ``start_features``): :math:`\\pi_c` replaced by a held-out gate on
       them, EM and moves judged by the curves' log-likelihood given the features
       (:func:`~pima_pyro.inference.gated_em.gated_split_and_merge`); its parameters are
       returned with the E-step on every sample, no curve-only EM after it;
    4. ``prune``: clusters whose removal lowers BIC become inactive, so a K above the data's
       number of clusters leaves the surplus empty: BIC of the gated score after stage 3
       (:func:`~pima_pyro.inference.gated_em.prune_gated`; the curves alone merged rates 2.7
       and 3.0 of ten decays), else of the physics log-likelihood (:func:`prune_clusters`).

    Experts that are not linear in theta take at most 50 EM iterations per run, each M-step an
    L-BFGS solve.

    With more than ``start_rows`` samples with a curve, stages 1 and 2 run on a random
    ``start_rows`` of them (seeded) and EM on all samples then starts from the E-step of the
    winner's parameters: the 20 EM runs and the split-and-merge moves cost what they cost for
    5,000 curves (MNIST: the start took 129 s of a 160 s fit before, 16 s now); the per-curve
    estimates and the final EM still see every curve (with the gated stage: only its E-step,
    the parameters come from the ``start_rows``). ``None`` searches on every sample.

    ``start_features`` (N, F), e.g. :func:`summary_features` of the images, add ``n_starts``
    starts (quantiles of the first principal direction, then k-means++) on the per-curve
    estimates joined with them; the physics log-likelihood chooses among all starts, and the
    gated stage (``gate``) then judges partitions by the curves given these features.
    (Ranking the starts by a joint likelihood with a Gaussian per cluster on the summaries
    instead chose partitions by writing style: ten decays, seeds 2-4, physics log-likelihood
    2-5 nats lower.)
    """
    data = em_problem(curves, masks, experts, grids, max_iter, tol)
    n_obs = int(data.any_observed.sum())
    if n_obs < n_clusters:
        raise ValueError(
            f"physics_mixture_em: {n_obs} samples with a physics modality observed, fewer than "
            f"n_clusters={n_clusters}"
        )
    if start_rows is not None and start_rows < n_clusters:
        raise ValueError(
            f"physics_mixture_em: start_rows must be >= n_clusters={n_clusters}, got {start_rows}"
        )
    feats = _start_features(data)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(data.any_observed.cpu().numpy())  # samples without a curve start uniform
    search, search_feats, rows, extra = _search_problem(
        data, feats, rows, start_features, start_rows, rng
    )
    best = _best_start(search, search_feats, rows, extra, n_clusters, n_starts, rng)
    if split_merge and n_clusters > 2:
        best = split_and_merge(best, search, search_feats)
    gated = gate and extra is not None and n_clusters > 1
    if gated:
        # no EM after it: EM on the curves alone would drift back towards the weights the
        # curves prefer (ten decays, half hidden, seed 3: the 3.0 cluster from 0.10 to 0.05)
        return _on_all_rows(_gated_stage(best, search, extra, rows, seed, prune), data)
    if search is not data:
        best = _refine_on_all_rows(best, data)
    if prune and n_clusters > 1:
        best = prune_clusters(best, data)
    return best


def _gated_stage(
    best: EMResult,
    search: _EMData,
    extra: np.ndarray,
    rows: np.ndarray,
    seed: int,
    prune: bool,
) -> EMResult:
    """:func:`~pima_pyro.inference.gated_em.gated_split_and_merge` on the ``rows`` of
    ``search`` with a curve, gated by ``extra`` and splitting on the per-curve estimates joined
    with ``extra``."""
    from pima_pyro.inference.gated_em import gated_split_and_merge  # it builds on this module

    keep = torch.as_tensor(rows, device=search.any_observed.device)
    on_rows = replace(best, responsibilities=best.responsibilities[keep])
    with_curve = _rows_of(search, keep)
    # standardised afresh: the rows without a curve sit at the median and shrink the MAD
    split_features = np.concatenate([_start_features(with_curve), extra[rows]], axis=1)
    return gated_split_and_merge(
        on_rows, with_curve, extra[rows], split_features, seed, prune=prune
    )


def _search_problem(
    data: _EMData,
    feats: np.ndarray,
    rows: np.ndarray,
    start_features: np.ndarray | None,
    start_rows: int | None,
    rng: np.random.Generator,
) -> tuple[_EMData, np.ndarray, np.ndarray, np.ndarray | None]:
    """The problem the starts and split-and-merge search: ``data`` itself, or a random
    ``start_rows`` of its samples with a curve (then every row of it has one)."""
    if start_rows is None or rows.size <= start_rows:
        return data, feats, rows, start_features
    keep = np.sort(rng.choice(rows, start_rows, replace=False))
    search = _rows_of(data, torch.as_tensor(keep, device=data.any_observed.device))
    extra = None if start_features is None else start_features[keep]
    return search, feats[keep], np.arange(keep.size), extra


def _best_start(
    data: _EMData,
    feats: np.ndarray,
    rows: np.ndarray,
    start_features: np.ndarray | None,
    n_clusters: int,
    n_starts: int,
    rng: np.random.Generator,
) -> EMResult:
    """EM from every start partition of the ``rows`` with a curve (on the per-curve estimates
    ``feats``, and joined with ``start_features``); the highest log-likelihood wins."""
    device = data.any_observed.device
    starts = _start_partitions(feats[rows], n_clusters, n_starts, rng)
    if start_features is not None:  # proposals only: the physics likelihood picks the start
        joint = np.concatenate([feats, start_features], axis=1)[rows]
        starts += _start_partitions(joint, n_clusters, n_starts, rng)
    all_active = torch.ones(n_clusters, dtype=torch.bool, device=device)
    best: EMResult | None = None
    for assign in starts:
        resp = torch.full((feats.shape[0], n_clusters), 1.0 / n_clusters, device=device)
        resp[torch.as_tensor(rows, device=device)] = torch.nn.functional.one_hot(
            torch.as_tensor(assign, device=device), n_clusters
        ).to(resp)
        result = em_from_responsibilities(resp.double(), data, all_active)
        if best is None or result.log_likelihood > best.log_likelihood:
            best = result
    assert best is not None
    return best


def _start_partitions(
    features: np.ndarray, n_clusters: int, n_starts: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``n_starts`` hard partitions of the rows of ``features``: quantiles of the first
    principal direction, then k-means++ draws."""
    _, _, vt = np.linalg.svd(features, full_matrices=False)
    ranks = np.argsort(np.argsort(features @ vt[0]))
    starts = [np.minimum(ranks * n_clusters // features.shape[0], n_clusters - 1)]
    return starts + [_kmeans_plus_plus(features, n_clusters, rng) for _ in range(n_starts - 1)]


def em_from_responsibilities(
    resp: torch.Tensor,
    data: _EMData,
    active: torch.Tensor,
    max_iter: int | None = None,
    theta_start: Mapping[str, torch.Tensor] | None = None,
) -> EMResult:
    """EM from responsibilities (N, K) with the ``active`` clusters only (others weight 0);
    non-linear experts' first M-step starts from ``theta_start`` when given."""
    y, m, t, experts = data.y, data.m, data.t, data.experts
    designs = {n: experts[n].design_matrix(t[n]) for n in y if experts[n].is_linear}
    theta: dict[str, torch.Tensor] = dict(theta_start or {})
    previous = -np.inf
    total = -np.inf
    n_iter = 0
    resp = resp * active
    for n_iter in range(1, (max_iter or data.max_iter) + 1):  # noqa: B007 (reported after)
        # M-step
        # a small floor lets an active cluster that lost its members win some back
        weights = (resp[data.any_observed].sum(0) + 1e-8) * active
        weights = weights / weights.sum().clamp_min(1e-300)
        noise2 = {}
        for name in y:
            w = resp * m[name][:, None]
            if name in designs:
                theta[name], s2 = weighted_least_squares(designs[name], y[name], w)
            else:
                if name not in theta:
                    total_w = w.sum(0).clamp_min(1e-12)
                    theta[name] = experts[name].initial_theta(
                        (w.T @ y[name]) / total_w[:, None], t[name]
                    )
                theta[name], s2 = fit_weighted_nonlinear(
                    experts[name], t[name], y[name], w, theta[name], steps=50
                )
            noise2[name] = s2.clamp_min(data.floors[name])
        resp, total = _e_step(data, weights, active, theta, noise2)
        if abs(total - previous) <= data.tol * abs(total):
            break
        previous = total
    return EMResult(
        weights=weights * active,
        theta=theta,
        noise_scale={n: v.sqrt() for n, v in noise2.items()},
        responsibilities=resp,
        log_likelihood=total,
        n_iter=n_iter,
        active=active.clone(),
    )


def _e_step(
    data: _EMData,
    weights: torch.Tensor,
    active: torch.Tensor,
    theta: Mapping[str, torch.Tensor],
    noise2: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """Responsibilities (N, K) and the total log-likelihood of the samples with a curve."""
    log_joint = log_weights_of(weights, active) + physics_log_likelihood(data, theta, noise2)
    return posterior_and_total(data, log_joint)


def physics_log_likelihood(
    data: _EMData, theta: Mapping[str, torch.Tensor], noise2: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    r""":math:`\sum_m \log p(y_{mn} \mid c)` (N, K) over the observed physics modalities."""
    total = torch.zeros((), dtype=torch.float64)  # (N, K) after the first modality
    for name in data.y:
        means = data.experts[name].expected_curve(theta[name], data.t[name])
        ll = cluster_log_likelihood(data.y[name], means, noise2[name].sqrt())
        total = total + ll * data.m[name][:, None]
    return total


def posterior_and_total(data: _EMData, log_joint: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Responsibilities (N, K) from ``log_joint`` (N, K) and its log-normaliser summed over
    the samples with a curve."""
    log_norm = marginalize_clusters(log_joint)
    resp = torch.exp(cluster_log_posterior_from_joint(log_joint))
    return resp, float(log_norm[data.any_observed].sum())


def _rows_of(data: _EMData, rows: torch.Tensor) -> _EMData:
    """The same EM problem on the samples ``rows`` only."""
    return replace(
        data,
        y={n: v[rows] for n, v in data.y.items()},
        m={n: v[rows] for n, v in data.m.items()},
        any_observed=data.any_observed[rows],
    )


def _on_all_rows(result: EMResult, data: _EMData) -> EMResult:
    """``result``'s parameters with the E-step on every sample of ``data``."""
    noise2 = {n: v**2 for n, v in result.noise_scale.items()}
    resp, total = _e_step(data, result.weights, result.active, result.theta, noise2)
    return replace(result, responsibilities=resp, log_likelihood=total)


def _refine_on_all_rows(result: EMResult, data: _EMData) -> EMResult:
    """EM on every sample, started from the E-step of ``result``'s parameters (a fit on a
    subsample of them)."""
    start = _on_all_rows(result, data).responsibilities
    return em_from_responsibilities(start, data, result.active, theta_start=result.theta)


def summary_features(
    values: torch.Tensor, observed: torch.Tensor, n_components: int = 10
) -> np.ndarray:
    """Standardised scores (N, F) on the leading principal components of a data modality
    (N, ...) over its observed rows; unobserved rows get 0 (the mean). F is at most
    ``n_components``. Cheap summaries of images or spectra for :func:`physics_mixture_em`'s
    ``start_features``."""
    flat = values.reshape(values.shape[0], -1).double()
    rows = flat[observed]
    q = max(1, min(n_components, rows.shape[1], rows.shape[0] - 1))
    centre = rows.mean(0)
    # eigenvectors of the (F x F) scatter matrix: exact, and cheap for images of 10^3 pixels
    _, vectors = torch.linalg.eigh((rows - centre).T @ (rows - centre))
    scores = (flat - centre) @ vectors[:, -q:].flip(-1)
    scores = scores / scores[observed].std(0).clamp_min(1e-12)
    return torch.where(observed[:, None], scores, torch.zeros_like(scores)).cpu().numpy()


def split_and_merge(
    result: EMResult,
    data: _EMData,
    features: np.ndarray,
    n_candidates: int = 3,
    max_rounds: int = 10,
) -> EMResult:
    r"""Split-and-merge EM (Ueda et al., 2000) on the physics mixture.

    Each round tries, for the ``n_candidates`` cluster pairs whose responsibilities overlap most
    (:math:`r_i^\top r_j / \lVert r_i\rVert \lVert r_j\rVert`: candidates to merge) and the
    ``n_candidates`` clusters whose members' per-curve estimates spread most (candidates to
    split), the move "merge i and j, split k in two by 2-means on its members' ``features``",
    runs EM from it and keeps the first move that raises the log-likelihood; it stops after a
    round without one.
    """
    for _ in range(max_rounds):
        improved = False
        moves = split_merge_candidates(
            result.responsibilities, result.active, features, n_candidates, n_candidates + 2
        )
        for i, j, k in moves:
            resp = merge_and_split(result.responsibilities, i, j, k, features)
            trial = em_from_responsibilities(resp, data, result.active)
            if trial.log_likelihood > result.log_likelihood + 1e-6 * abs(result.log_likelihood):
                result, improved = trial, True
                break
        if not improved:
            break
    return result


def split_merge_candidates(
    resp: torch.Tensor,
    active: torch.Tensor,
    features: np.ndarray,
    n_pairs: int,
    n_splits: int,
) -> list[tuple[int, int, int]]:
    """``(i, j, k)``: merge j into i, split k. The ``n_pairs`` active pairs whose
    responsibilities (N, K) overlap most (cosine of their columns) times the ``n_splits`` active
    clusters whose members' ``features`` (N, F) spread most (summed weighted variance)."""
    on = active.cpu().numpy()
    r = resp.detach().double().cpu().numpy() * on
    clusters = np.flatnonzero(on)
    norms = np.maximum(np.linalg.norm(r, axis=0), 1e-150)  # an empty column: overlap 0
    overlap = (r.T @ r) / np.outer(norms, norms)
    pairs = sorted(
        ((overlap[i, j], i, j) for a, i in enumerate(clusters) for j in clusters[a + 1 :]),
        reverse=True,
    )[:n_pairs]
    weight = r.sum(0) + 1e-300
    centre = (r.T @ features) / weight[:, None]
    spread = ((r.T @ features**2) / weight[:, None] - centre**2).sum(1)
    splits = sorted(clusters, key=lambda c: -spread[c])[:n_splits]
    return [(int(i), int(j), int(k)) for _, i, j in pairs for k in splits if k not in (i, j)]


def merge_and_split(
    resp: torch.Tensor, i: int, j: int, k: int, features: np.ndarray
) -> torch.Tensor:
    """Responsibilities with j merged into i and k's members split between k and j."""
    members = np.flatnonzero(resp.argmax(1).cpu().numpy() == k)
    return _move_half(_merged(resp, i, j), members, k, j, features)


def resplit_pair(resp: torch.Tensor, i: int, j: int, features: np.ndarray) -> torch.Tensor:
    """Responsibilities with the members of i and j pooled and split anew between them by
    2-means on their ``features``: two clusters that cut one group at random, re-cut along
    what the features separate."""
    members = np.flatnonzero(np.isin(resp.argmax(1).cpu().numpy(), (i, j)))
    return _move_half(_merged(resp, i, j), members, i, j, features)


def _merged(resp: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """A copy of ``resp`` with cluster j's weight moved into i."""
    out = resp.clone()
    out[:, i] += out[:, j]
    out[:, j] = 0.0
    return out


def _move_half(
    out: torch.Tensor, members: np.ndarray, source: int, target: int, features: np.ndarray
) -> torch.Tensor:
    """``out`` with the weight of ``source`` moved to ``target`` for one half of ``members``
    (2-means on their ``features``), in place."""
    if members.size < 2:
        return out
    halves = _kmeans_plus_plus(features[members], 2, np.random.default_rng(0))
    moved = torch.as_tensor(members[halves == 1], device=out.device)
    out[moved, target] = out[moved, source]
    out[moved, source] = 0.0
    return out


def bic_cluster_penalty(params_per_cluster: int, n_samples: int) -> float:
    r"""What one cluster must add to a log-likelihood to be kept under the Bayesian information
    criterion :math:`-2\log L + p\log N`: :math:`\tfrac12 p_c \log N`, :math:`N` the rows
    the log-likelihood sums over (the samples with a curve the pruning sees)."""
    return 0.5 * params_per_cluster * math.log(max(n_samples, 2))


class Prunable(Protocol):
    """A mixture fit the pruning loop can shrink: its active clusters, their weights and the
    log-likelihood it is judged by."""

    @property
    def active(self) -> torch.Tensor: ...

    @property
    def weights(self) -> torch.Tensor: ...

    @property
    def log_likelihood(self) -> float: ...


P = TypeVar("P", bound=Prunable)


def remove_while_bic_falls(
    state: P, without: Callable[[P, torch.Tensor], P], penalty: float, max_tries: int = 3
) -> P:
    """The pruning loop: each round tries the ``max_tries`` lightest active clusters, refits
    without each (``without(state, active)``) and keeps the first whose log-likelihood falls
    by less than ``penalty`` (:func:`bic_cluster_penalty`); stops when none does or one
    cluster is left."""
    while int(state.active.sum()) > 1:
        order = [int(c) for c in torch.argsort(state.weights) if bool(state.active[c])]
        for c in order[:max_tries]:
            fewer = state.active.clone()
            fewer[c] = False
            trial = without(state, fewer)
            if trial.log_likelihood > state.log_likelihood - penalty:
                state = trial
                break
        else:
            break
    return state


def prune_clusters(result: EMResult, data: _EMData, max_tries: int = 3) -> EMResult:
    r"""Remove clusters while that lowers the Bayesian information criterion
    :math:`-2\log L + p\log N` (:math:`p` free parameters, :math:`N` samples with a physics
    modality): a cluster stays only if it raises the log-likelihood by more than
    :math:`\tfrac12 p_c \log N` (:math:`p_c`: theta and noise per modality, and a weight).
    Removed clusters become inactive (weight 0) and their members go to the others through
    EM (:func:`remove_while_bic_falls`)."""
    penalty = bic_cluster_penalty(data.params_per_cluster, int(data.any_observed.sum()))
    return remove_while_bic_falls(result, partial(_em_without, data), penalty, max_tries)


def _em_without(data: _EMData, result: EMResult, active: torch.Tensor) -> EMResult:
    """EM from ``result``'s responsibilities with the ``active`` clusters only."""
    return em_from_responsibilities(result.responsibilities, data, active)


def mixture_from_embeddings(
    loc: torch.Tensor,
    log_var: torch.Tensor,
    responsibilities: torch.Tensor | None,
    n_clusters: int,
    seed: int = 0,
    min_scale: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mixture ``(weights, loc, scale)`` from embeddings ``loc`` (N, D) with variances.

    With responsibilities :math:`r` (N, K): :math:`\mu_c = \sum_n r_{nc} m_n / \sum_n r_{nc}`
    and :math:`\sigma_c^2 = \sum_n r_{nc} [(m_n - \mu_c)^2 + v_n] / \sum_n r_{nc}` (the second
    moment of the embedding posteriors). Without them, a diagonal GMM (scikit-learn) on the means.
    """
    if responsibilities is None:
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(n_clusters, covariance_type="diag", random_state=seed, n_init=3)
        gmm.fit(loc.detach().double().cpu().numpy())
        responsibilities = torch.as_tensor(
            gmm.predict_proba(loc.detach().double().cpu().numpy()), device=loc.device
        )
    r = responsibilities.to(loc.device).double()
    mean = loc.detach().double()
    var = torch.exp(log_var.detach().double())
    total = r.sum(0).clamp_min(1e-8)
    mu = (r.T @ mean) / total[:, None]
    second = (r.T @ (mean**2 + var)) / total[:, None] - mu**2
    scale = second.clamp_min(min_scale**2).sqrt()
    weights = total / total.sum()
    return weights.to(loc.dtype), mu.to(loc.dtype), scale.to(loc.dtype)
