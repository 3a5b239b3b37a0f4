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

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pima_pyro.models.experts import (
    NOISE_SCALE_MIN,
    PhysicsExpert,
    cluster_log_likelihood,
    fit_weighted_nonlinear,
    weighted_least_squares,
)
from pima_pyro.models.mixture import cluster_log_posterior_from_joint, marginalize_clusters


@dataclass
class EMResult:
    """Output of :func:`physics_mixture_em` (tensors on the input's device)."""

    weights: torch.Tensor  # (K,)
    theta: dict[str, torch.Tensor]  # name -> (K, P)
    noise_scale: dict[str, torch.Tensor]  # name -> (K,)
    responsibilities: torch.Tensor  # (N, K)
    log_likelihood: float  # total, at the returned parameters
    n_iter: int


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


def _start_features(
    curves: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    experts: Mapping[str, PhysicsExpert],
    grids: Mapping[str, torch.Tensor],
) -> np.ndarray:
    """Features that separate clusters, standardised: (N, F).

    Linear experts: each sample's least-squares theta. Others: the leading principal
    components (at most 5) of the standardised curves.
    """
    columns = []
    for name, y in curves.items():
        observed = masks[name]
        if experts[name].is_linear:
            design = experts[name].design_matrix(grids[name].to(y))
            feats = torch.linalg.lstsq(design, y.T).solution.T  # (N, P)
        else:
            centred = (y - y[observed].mean(0)) / (y[observed].std(0) + 1e-12)
            _, _, vt = torch.linalg.svd(centred[observed], full_matrices=False)
            feats = centred @ vt[: min(5, vt.shape[0])].T
        feats = torch.where(observed[:, None], feats, feats[observed].mean(0))
        columns.append(feats)
    out = torch.cat(columns, dim=1).double().cpu().numpy()
    return (out - out.mean(0)) / (out.std(0) + 1e-12)


def physics_mixture_em(
    curves: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    experts: Mapping[str, PhysicsExpert],
    grids: Mapping[str, torch.Tensor],
    n_clusters: int,
    n_starts: int = 5,
    max_iter: int = 300,
    tol: float = 1e-7,
    seed: int = 0,
) -> EMResult:
    """EM for the mixture of physics experts; best of ``n_starts`` starts (float64).

    Starts: one from quantiles of the first principal direction of the start features
    (:func:`_start_features`), the others from k-means++ on them. Experts that are not linear in
    theta take at most 50 EM iterations, each M-step an L-BFGS solve.
    """
    device = next(iter(curves.values())).device
    y = {n: v.double() for n, v in curves.items()}
    m = {n: masks[n].to(device) for n in curves}
    t = {n: grids[n].double().to(device) for n in curves}
    any_observed = torch.stack(list(m.values())).any(0)
    n_obs = int(any_observed.sum())
    if n_obs < n_clusters:
        raise ValueError(
            f"physics_mixture_em: {n_obs} samples with a physics modality observed, fewer than "
            f"n_clusters={n_clusters}"
        )
    feats = _start_features(y, m, experts, t)
    rng = np.random.default_rng(seed)
    starts: list[np.ndarray] = []
    _, _, vt = np.linalg.svd(feats[any_observed.cpu().numpy()], full_matrices=False)
    score = feats @ vt[0]
    ranks = np.argsort(np.argsort(score))
    starts.append(np.minimum(ranks * n_clusters // feats.shape[0], n_clusters - 1))
    for _ in range(max(n_starts - 1, 0)):
        starts.append(_kmeans_plus_plus(feats, n_clusters, rng))
    floors = {n: max(NOISE_SCALE_MIN**2, 1e-6 * float(v[m[n]].var())) for n, v in y.items()}
    if not all(e.is_linear for e in experts.values()):
        max_iter = min(max_iter, 50)
    best: EMResult | None = None
    for assign in starts:
        resp = torch.nn.functional.one_hot(
            torch.as_tensor(assign, device=device), n_clusters
        ).double()
        result = _em_from_responsibilities(
            resp, y, m, experts, t, any_observed, floors, max_iter, tol
        )
        if best is None or result.log_likelihood > best.log_likelihood:
            best = result
    assert best is not None
    return best


def _em_from_responsibilities(
    resp: torch.Tensor,
    y: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
    experts: Mapping[str, PhysicsExpert],
    t: Mapping[str, torch.Tensor],
    any_observed: torch.Tensor,
    floors: Mapping[str, float],
    max_iter: int,
    tol: float,
) -> EMResult:
    designs = {n: experts[n].design_matrix(t[n]) for n in y if experts[n].is_linear}
    theta: dict[str, torch.Tensor] = {}
    previous = -np.inf
    total = -np.inf
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        # M-step
        weights = resp[any_observed].mean(0).clamp_min(1e-8)
        weights = weights / weights.sum()
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
            noise2[name] = s2.clamp_min(floors[name])
        # E-step
        log_joint = torch.log(weights).expand(resp.shape).clone()
        for name in y:
            means = experts[name].expected_curve(theta[name], t[name])
            ll = cluster_log_likelihood(y[name], means, noise2[name].sqrt())
            log_joint = log_joint + ll * m[name][:, None]
        log_norm = marginalize_clusters(log_joint)
        resp = torch.exp(cluster_log_posterior_from_joint(log_joint))
        total = float(log_norm[any_observed].sum())
        if abs(total - previous) <= tol * abs(total):
            break
        previous = total
    return EMResult(
        weights=weights,
        theta=theta,
        noise_scale={n: v.sqrt() for n, v in noise2.items()},
        responsibilities=resp,
        log_likelihood=total,
        n_iter=n_iter,
    )


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
