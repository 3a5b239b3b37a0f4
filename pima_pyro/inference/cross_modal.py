r"""The cross-modal cluster term: what teaches a data modality's encoder the physics' clusters.

The ELBO trains a data encoder :math:`q(z \mid x_d)` towards the clusters only through the
samples on which it is drawn alone (a quarter of the paired ones under subset training), by a
single reparameterised draw scored against the mixture. With many unpaired samples that signal
is outweighed by the unpaired samples' KL term and the encoder collapses onto the prior (issue
13: with half the curves hidden, image-only accuracy 0.11 on 2 of 5 seeds). This term adds, for
every sample whose data modality :math:`d` and at least one physics modality are observed, the
cross-entropy from the exact physics cluster posterior to the cluster posterior implied by
:math:`q(z \mid x_d)` alone,

.. math::

    \ell_n = -\sum_c r_{nc} \log \tilde q_d(c \mid x_{dn}), \qquad
    r_{nc} = p(c \mid y_n), \qquad
    \tilde q_d(c \mid x) \propto \pi_c \exp \mathbb E_{q(z \mid x)} \log \mathcal N(z; \mu_c,
    \sigma_c^2),

the variational optimum for :math:`c` given :math:`q(z \mid x)` (VaDE's :math:`q(c \mid x)`),
in closed form. The target :math:`r` and the globals :math:`\pi, \mu, \sigma, \theta` are held
fixed (no gradient): only the encoders learn from it, so the generative model's parameters are
fitted by the ELBO alone. Minimising :math:`\mathrm{KL}(r \,\|\, \tilde q_d)` over the encoder is
the wake-phase update of reweighted wake-sleep, with the physics posterior, exact because
:math:`y \perp z \mid c`, in place of importance samples; it is the explicit classification
term of semi-supervised VAEs (Kingma et al., 2014, M2), with labels the physics infers.
"""

from __future__ import annotations

import torch

from pima_pyro.data import Batch
from pima_pyro.inference.posterior import any_observed_rows, cluster_log_posterior
from pima_pyro.models.guide import encode
from pima_pyro.models.mixture import cluster_log_posterior_from_joint, expected_normal_log_prob
from pima_pyro.models.module import PIMAModule


def has_cross_modal_term(net: PIMAModule) -> bool:
    """The term exists when the model has a physics and a data modality."""
    return bool(net.physics_names) and bool(net.data_names)


def physics_targets(net: PIMAModule, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, paired)``: the exact :math:`p(c \\mid y_n)` (B, K) from the observed physics
    modalities, and whether any is observed (B,), both without gradient."""
    physics = [p for p in net.physics_names if p in batch.values]
    with torch.no_grad():
        log_r = cluster_log_posterior(net, batch, physics)
    return log_r.exp(), any_observed_rows(batch, physics, slice(0, batch.size))


def encoder_cluster_log_posterior(net: PIMAModule, name: str, values: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \tilde q_d(c \mid x)` (B, K) for data modality ``name`` alone, with the
    mixture held fixed (gradient to the encoder only)."""
    observed = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    loc, log_var = encode(net, {name: values}, {name: observed})
    mix = net.mixture
    expected = expected_normal_log_prob(
        loc, torch.exp(log_var), mix.loc.detach(), mix.scale.detach()
    )
    return cluster_log_posterior_from_joint(net.plug_in_logits().detach() + expected)


def cross_modal_loss(net: PIMAModule, batch: Batch) -> torch.Tensor:
    """:math:`\\frac1{B_y} \\sum_d \\sum_n \\ell_{dn}` over the samples with ``d`` and a
    physics modality observed, :math:`B_y` the samples of the batch with a physics modality (0
    when the model lacks either kind). A mean over the paired samples, not over the batch: the
    term's strength does not shrink with the fraction of samples paired (with 5% of the curves
    measured, a mean over the batch left the image encoder collapsed in every fit)."""
    total = torch.zeros((), device=batch.indices.device)
    if not has_cross_modal_term(net):
        return total
    target, paired = physics_targets(net, batch)
    for name in net.data_names:
        if name not in batch.values:
            continue
        log_q = encoder_cluster_log_posterior(net, name, batch.values[name])
        weight = (batch.observed[name] & paired).to(log_q.dtype)
        total = total - ((target * log_q).sum(-1) * weight).sum()
    return total / paired.sum().clamp_min(1)
