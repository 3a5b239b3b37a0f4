r"""The seed's "closed form expressions for loss, no Monte Carlo" for the mixture terms.

With :math:`q(z) = \mathcal N(m, \operatorname{diag} v)` (the PoE posterior) and a cluster
distribution :math:`\gamma_c` per sample, the bound

.. math::

    \mathcal L_\gamma = \mathbb E_q \log p(x \mid z) + \sum_c \gamma_c \big[\log \pi_c
    + \mathbb E_q \log \mathcal N(z; \mu_c, \sigma_c^2) + \textstyle\sum_m \log p(y_m \mid c)
    - \log \gamma_c\big] + \mathbb H[q]

has the mixture terms in closed form,

.. math::

    \mathbb E_q \log \mathcal N(z; \mu_c, \sigma_c^2) = -\tfrac12 \sum_d \Big[\log 2\pi\sigma_{cd}^2
    + \frac{v_d + (m_d - \mu_{cd})^2}{\sigma_{cd}^2}\Big],\qquad
    \mathbb H[q] = \tfrac12 \sum_d (1 + \log 2\pi v_d),

and only the decoder term :math:`\mathbb E_q \log p(x \mid z)` is sampled (one draw).
:math:`\gamma` is the maximiser, :math:`\gamma_c \propto \exp(a_c)` with :math:`a_c` the bracket
without :math:`-\log\gamma_c`, which gives :math:`\sum_c \gamma_c(a_c - \log\gamma_c) =
\operatorname{logsumexp}_c a_c`. The physics likelihood enters :math:`\gamma` (unlike the
reference implementation). By Jensen this bound is below the enumerated Monte-Carlo ELBO's
expectation, :math:`\operatorname{logsumexp}_c \mathbb E_q[\cdot] \le \mathbb E_q
\operatorname{logsumexp}_c[\cdot]`; it equals the expectation of the Monte-Carlo ELBO whose guide
enumerates :math:`c \sim \gamma` (tested).
"""

from __future__ import annotations

import torch

from pima_pyro.data import Batch
from pima_pyro.inference.posterior import physics_cluster_log_likelihood
from pima_pyro.models.guide import encode, latent_distribution
from pima_pyro.models.mixture import marginalize_clusters
from pima_pyro.models.module import PIMAModule


def mixture_terms(
    net: PIMAModule, batch: Batch, loc: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    r""":math:`a_c = \log\pi_c + \mathbb E_q \log \mathcal N(z; \mu_c, \sigma_c^2) +
    \sum_m \log p(y_m \mid c)` per sample and cluster, (B, K)."""
    mix = net.mixture
    a = mix.log_weights + mix.expected_component_log_prob(loc, var)
    return a + physics_cluster_log_likelihood(net, batch, net.physics_names, slice(0, batch.size))


def closed_form_bound(net: PIMAModule, batch: Batch) -> torch.Tensor:
    r"""Per-sample :math:`\mathcal L_\gamma` at the optimal :math:`\gamma`, (B,)."""
    masks = batch.encode if batch.encode is not None else batch.observed
    loc, log_var = encode(net, batch.values, masks)
    q = latent_distribution(loc, log_var)
    noise = torch.randn_like(loc) if batch.noise is None else batch.noise
    z = loc + q.base_dist.scale * noise
    bound = marginalize_clusters(mixture_terms(net, batch, loc, torch.exp(log_var)))
    bound = bound + q.entropy()
    for name in net.data_names:
        ll = net.modalities[name].likelihood(z).log_prob(batch.values[name])
        bound = bound + ll * batch.observed[name]
    return bound


def closed_form_loss(net: PIMAModule, batch: Batch) -> torch.Tensor:
    """``-sum(bound) * (n_total / B) / n_total``: the per-sample training loss."""
    return -closed_form_bound(net, batch).sum() / batch.size
