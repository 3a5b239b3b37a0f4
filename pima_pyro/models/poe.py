r"""Product of Gaussian experts.

Each observed modality :math:`m \in S` contributes a diagonal Gaussian expert
:math:`\mathcal N(\mu_m, \sigma_m^2)`; their (normalised) product is again Gaussian:

.. math::

    \sigma^{-2} = [\text{prior}] + \sum_{m \in S} \sigma_m^{-2}, \qquad
    \frac{\mu}{\sigma^2} = \sum_{m \in S} \frac{\mu_m}{\sigma_m^2}

where the optional prior expert is :math:`\mathcal N(0, I)` (precision 1, mean 0). Precisions are
summed in log space (``logsumexp`` of :math:`-\log\sigma_m^2`) so that a very confident expert
neither overflows nor swamps the others numerically, and every expert's log-variance is clamped
to ``[LOG_VAR_MIN, LOG_VAR_MAX]`` first.

A sample with no observed expert and no prior expert has no posterior; that case returns the
standard normal (mean 0, log-variance 0) rather than NaN, and callers that need to know can
check ``masks.any(0)``.
"""

from __future__ import annotations

import torch

#: Floor on an expert's log-variance: sigma >= exp(-9) ~ 1.2e-4 (float32 safe).
LOG_VAR_MIN: float = -18.0
#: Ceiling on an expert's log-variance: sigma <= exp(9); beyond that an expert is "vague".
LOG_VAR_MAX: float = 18.0


def poe_posterior(
    locs: torch.Tensor,
    log_vars: torch.Tensor,
    masks: torch.Tensor | None = None,
    prior_expert: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Combine Gaussian experts by precision weighting.

    Args:
        locs: expert means, shape ``(M, N, D)`` (M experts, N samples, D latent dims).
        log_vars: expert log-variances, same shape.
        masks: boolean ``(M, N)``; ``masks[m, n]`` says expert m is present for sample n.
            ``None`` means all present.
        prior_expert: include the :math:`\mathcal N(0, I)` expert.

    Returns:
        ``(loc, log_var)`` of the product, each ``(N, D)``.
    """
    if locs.shape != log_vars.shape or locs.dim() != 3:
        raise ValueError(
            f"poe_posterior: locs and log_vars must both be (M, N, D); got {tuple(locs.shape)} "
            f"and {tuple(log_vars.shape)}"
        )
    num_experts, num_samples, _ = locs.shape
    if masks is None:
        masks = torch.ones(num_experts, num_samples, dtype=torch.bool, device=locs.device)
    if masks.shape != (num_experts, num_samples):
        raise ValueError(
            f"poe_posterior: masks must be ({num_experts}, {num_samples}); got {tuple(masks.shape)}"
        )
    log_vars = log_vars.clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    neg_inf = torch.finfo(locs.dtype).min
    # log precision of each expert, -inf where absent
    log_prec = torch.where(masks.unsqueeze(-1), -log_vars, torch.full_like(log_vars, neg_inf))
    if prior_expert:
        prior = torch.zeros_like(log_prec[:1])  # log(1) for the N(0, I) expert
        log_prec = torch.cat([log_prec, prior], dim=0)
        locs = torch.cat([locs, torch.zeros_like(locs[:1])], dim=0)
    total_log_prec = torch.logsumexp(log_prec, dim=0)  # (N, D)
    any_expert = torch.isfinite(total_log_prec) & (total_log_prec > neg_inf / 2)
    total_log_prec = torch.where(any_expert, total_log_prec, torch.zeros_like(total_log_prec))
    # normalised weights w_m = prec_m / sum prec, computed without leaving log space
    weights = torch.exp(log_prec - total_log_prec.unsqueeze(0))
    loc = (weights * locs).sum(0)
    loc = torch.where(any_expert, loc, torch.zeros_like(loc))
    return loc, -total_log_prec
