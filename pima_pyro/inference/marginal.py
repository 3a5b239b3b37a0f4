r"""Pointwise log-likelihoods of the model, marginal over the local latents.

For sample :math:`n` and one draw :math:`g` of the globals (:math:`\pi`, :math:`\mu`,
:math:`\sigma`, decoders, :math:`\theta`, :math:`s`), the quantity a PSIS-LOO or WAIC needs is

.. math::

    \log p(x_{S,n} \mid g) = \log \int \sum_c \pi_c\, \mathcal N(z; \mu_c, \sigma_c^2)
        \prod_{m \in S \cap D} p(x_{mn} \mid z) \prod_{m \in S \cap P} p(y_{mn} \mid c)\, dz,

with :math:`S` the observed modalities (all of them for ``total``, one for a per-modality term).

* A **physics** modality alone does not involve :math:`z`: :math:`\log \sum_c \pi_c
  p(y_{mn} \mid c)`, **exact**.
* Anything with a **data** modality is estimated by importance sampling with the encoder as
  proposal, :math:`z_j \sim q(z \mid x_{S \cap D,n})`, :math:`j = 1..J`:
  :math:`\log \frac1J \sum_j w_j`, :math:`w_j = p(x, z_j \mid g) / q(z_j)`, the sum over
  :math:`c` exact inside :math:`w_j`. Its Monte-Carlo standard error (delta method,
  :math:`\operatorname{sd}(w) / (\sqrt J\, \bar w)`) is returned beside it. The same :math:`z_j`
  serve every draw of the globals (common random numbers), which keeps the cost at :math:`J N`
  decoder evaluations.

Unobserved entries contribute 0; a row with no data modality observed gets the exact physics
marginal for ``total``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from pima_pyro.data import Batch
from pima_pyro.models.guide import encode, latent_distribution
from pima_pyro.models.mixture import log_mean_exp, log_weights_of, marginalize_clusters
from pima_pyro.models.module import PIMAModule

#: Upper bound on the elements of the (draws, J, rows, K) tensor held at once.
MAX_ELEMENTS: int = 2**24


def physics_cluster_terms(
    net: PIMAModule, batch: Batch, names: Sequence[str], draws: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``log p(y_mn | c, g_s) * observed`` per physics modality: (S, N, K)."""
    out = {}
    for name in names:
        ll = net.modalities[name].cluster_log_likelihood(
            batch.values[name], draws[f"theta_{name}"], draws[f"noise_{name}"]
        )
        out[name] = ll * batch.observed[name][:, None]
    return out


def _importance_estimate(
    net: PIMAModule,
    batch: Batch,
    data_names: Sequence[str],
    log_pi: torch.Tensor,
    physics_terms: torch.Tensor,
    num_importance: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""IS estimate of :math:`\log p(x_D, y \mid g_s)` and its standard error, (S, N) each.

    ``physics_terms`` (S, N, K) is the summed physics log-likelihood per cluster (zeros for
    none); ``data_names`` the data modalities that enter (and define the proposal).
    """
    values = {n: batch.values[n] for n in data_names}
    masks = {n: batch.observed[n] for n in data_names}
    loc, log_var = encode(net, values, masks)
    q = latent_distribution(loc, log_var)
    z = _draw(q, num_importance, generator)
    log_w = -q.log_prob(z)  # (J, N)
    for name in data_names:
        log_w = log_w + net.modalities[name].likelihood(z).log_prob(values[name]) * masks[name]
    component = net.mixture.component().log_prob(z.unsqueeze(-2))  # (J, N, K)
    n_draws, n_rows, k = physics_terms.shape
    step = max(1, MAX_ELEMENTS // max(1, num_importance * n_rows * k))
    estimates, errors = [], []
    for start in range(0, n_draws, step):
        sl = slice(start, min(start + step, n_draws))
        joint = (
            log_pi[sl, None, None, :] + component[None] + physics_terms[sl, None, :, :]
        )  # (s, J, N, K)
        lw = log_w[None] + marginalize_clusters(joint)  # (s, J, N)
        estimates.append(log_mean_exp(lw, dim=1))
        errors.append(_log_mean_exp_se(lw, dim=1))
    return torch.cat(estimates), torch.cat(errors)


def _draw(q, num: int, generator: torch.Generator | None) -> torch.Tensor:
    base = q.base_dist
    eps = torch.randn(
        (num, *base.loc.shape), device=base.loc.device, dtype=base.loc.dtype, generator=generator
    )
    return base.loc + base.scale * eps


def _log_mean_exp_se(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Delta-method standard error of :math:`\log \bar w`: :math:`\operatorname{sd}(w) /
    (\sqrt J\, \bar w)`, computed on :math:`w / \max w`."""
    count = log_w.shape[dim]
    if count < 2:
        return torch.full_like(log_w.select(dim, 0), float("inf"))
    scaled = torch.exp(log_w - log_w.amax(dim, keepdim=True))
    return scaled.std(dim) / (scaled.mean(dim) * math.sqrt(count))


@torch.no_grad()
def pointwise_log_likelihood(
    net: PIMAModule,
    batch: Batch,
    draws: Mapping[str, torch.Tensor],
    names: Sequence[str],
    num_importance: int = 64,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-modality and ``total`` log-likelihoods (S, N), and their Monte-Carlo standard errors
    (zero where exact), for the globals ``draws`` (``pi`` (S, K), ``theta_<m>`` (S, K, P),
    ``noise_<m>`` (S, K)) and the modalities ``names`` of ``batch``."""
    if not isinstance(num_importance, int) or num_importance < 2:
        raise ValueError(f"num_importance must be an int >= 2, got {num_importance!r}")
    physics = [n for n in names if net.is_physics(n)]
    data = [n for n in names if not net.is_physics(n)]
    log_pi = log_weights_of(draws["pi"], net.mixture.active)  # (S, K)
    n_draws, k = log_pi.shape
    phys = physics_cluster_terms(net, batch, physics, draws)
    zeros = log_pi.new_zeros(n_draws, batch.size, k)
    log_lik: dict[str, torch.Tensor] = {}
    errors: dict[str, torch.Tensor] = {}
    for name in physics:
        exact = marginalize_clusters(log_pi[:, None, :] + phys[name])
        log_lik[name] = exact * batch.observed[name]
        errors[name] = torch.zeros_like(exact)
    for name in data:
        est, se = _importance_estimate(net, batch, [name], log_pi, zeros, num_importance, generator)
        log_lik[name] = est * batch.observed[name]
        errors[name] = se * batch.observed[name]
    phys_total = sum(phys.values(), zeros)
    total = marginalize_clusters(log_pi[:, None, :] + phys_total)
    total_se = torch.zeros_like(total)
    if physics:
        any_observed = torch.stack([batch.observed[n] for n in physics]).any(0)
        total = total * any_observed
    if data:
        has_data = torch.stack([batch.observed[n] for n in data]).any(0)
        est, se = _importance_estimate(
            net, batch, data, log_pi, phys_total, num_importance, generator
        )
        total = torch.where(has_data, est, total)
        total_se = torch.where(has_data, se, total_se)
    log_lik["total"] = total
    errors["total"] = total_se
    return log_lik, errors
