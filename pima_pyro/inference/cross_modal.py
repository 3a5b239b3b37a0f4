r"""The cross-modal cluster term: what teaches a data modality's encoder the physics' clusters.

The ELBO trains a data encoder :math:`q(z \mid x_d)` towards the clusters only through the
samples on which it is drawn alone (a quarter of the paired ones under subset training), by a
single reparameterised draw scored against the mixture. With many unpaired samples that signal
is outweighed by the unpaired samples' KL term and the encoder collapses onto the prior (issue
13: with half the curves hidden, image-only accuracy 0.11 on 2 of 5 seeds). The term has two
parts. The paired part (weight ``cross_modal_weight``) adds, for every sample whose data
modality :math:`d` and at least one physics modality are observed, the cross-entropy from the
sample's cluster posterior given its curve (and, ramped in, its data modalities) to the cluster
posterior implied by :math:`q(z \mid x_d)` alone,

.. math::

    \ell_n = -\sum_c r_{nc} \log \tilde q_d(c \mid x_{dn}), \qquad
    r_{nc} \propto \pi_c^{1 - \lambda}\, \tilde q(c \mid x_{Dn})^{\lambda}
    \prod_p p(y_{pn} \mid c), \qquad
    \tilde q_d(c \mid x) \propto \pi_c \exp \mathbb E_{q(z \mid x)} \log \mathcal N(z; \mu_c,
    \sigma_c^2),

:math:`\tilde q_d` the variational optimum for :math:`c` given :math:`q(z \mid x)` (VaDE's
:math:`q(c \mid x)`), in closed form, and :math:`\tilde q(c \mid x_D)` the same from the PoE of
every observed data modality :math:`D`. The target :math:`r` and the globals
:math:`\pi, \mu, \sigma, \theta` are held fixed (no gradient): only the encoders learn from it,
so the generative model's parameters are fitted by the ELBO alone. At :math:`\lambda = 0`,
:math:`r` is the exact physics posterior :math:`p(c \mid y_n)` (exact because
:math:`y \perp z \mid c`) and minimising :math:`\mathrm{KL}(r \,\|\, \tilde q_d)` is the
explicit classification term of semi-supervised VAEs (Kingma et al., 2014, M2) with labels the
physics infers. Its optimum is :math:`\mathbb E[p(c \mid y) \mid x]`, the clusters blurred by
the curves' confusion: where two clusters' curves overlap (the digits' rates 2.4, 2.7 and 3.0
at noise 0.1: the physics alone places 0.895 of the paired training curves of issue 13's
hidden-curve set right), each image is taught the confusion of a curve it does not see. At
:math:`\lambda = 1`, :math:`r` is the posterior given the curve and the data modalities, with
:math:`\tilde q` standing in for :math:`\pi_c\, p(x \mid c)`: the E-step's responsibilities,
the wake-phase target of reweighted wake-sleep. :math:`\lambda` is the self-training ramp's
factor (``self_training_ramp``, below): :math:`1 / (\texttt{self\_training\_ramp} \cdot
\texttt{epochs})` in the first epoch, rising linearly to 1 (the target is never the physics
posterior exactly, only close to it at first). At 1 from the first step
(``self_training_ramp=0``), an encoder that starts confidently wrong teaches itself (a
unit-test toy: 0.63 of the clusters right after 300 steps, against at least 0.98 ramped).

**Rows without a physics modality** (unpaired images) get the self-training part (weight
``self_training_weight``)

.. math::

    \ell^{u}_n = -\sum_c t_{nc} \log \tilde q_d(c \mid x_{dn}), \qquad
    t_{nc} \propto \tilde q(c \mid x_{Dn})^{1/T}, \quad T = 1/2,

the cross-entropy to the sharpened, fixed cluster posterior from all of the row's observed data
modalities :math:`D` (MixMatch's sharpening, Berthelot et al., 2019). Its gradient moves an
unpaired sample's encoding towards the cluster the encoders already favour, faster the more
confident they are: minimum-entropy regularisation (Grandvalet and Bengio, 2005), the cluster
assumption that unlabelled data teaches a classifier. Without it those rows reach the encoder
only through the ELBO's KL term at temperature 1, and half the curves hidden gave no gain over
discarding the unpaired images (issue 13: 0.952 vs 0.957 and 0.942 vs 0.963 image-only on
seeds 1 and 2); with the term, ramped, image-only accuracy is above the paired half's on 13
of 15 fits (5 data seeds, 3 training seeds each; mean gain 0.024, docs/method.md). With several
data modalities the target is their joint posterior, so each encoder also learns what the others
see (co-training). The training plan ramps :math:`w_u` and :math:`\lambda` in linearly over the
first ``self_training_ramp`` of the epochs (default half; ``Schedule.ramp_factor``), as
semi-supervised training ramps its unlabelled term: early on the encoders' sharpened guesses come
from an encoder that has not yet met the physics' clusters, and with few curves measured they
were reinforced (issue 14: the 10% round of active learning fell from 0.769 to 0.724 for EIG
with the full weight from the start).
"""

from __future__ import annotations

import torch

from pima_pyro.data import Batch
from pima_pyro.inference.posterior import any_observed_rows, physics_cluster_log_likelihood
from pima_pyro.models.guide import combine_experts, encode_experts
from pima_pyro.models.mixture import cluster_log_posterior_from_joint, expected_normal_log_prob
from pima_pyro.models.module import PIMAModule

#: Temperature :math:`T` of the self-training target on rows without a physics modality.
SELF_TRAINING_TEMPERATURE = 0.5


def has_cross_modal_term(net: PIMAModule) -> bool:
    """The term exists when the model has a physics and a data modality."""
    return bool(net.physics_names) and bool(net.data_names)


def _physics_in(net: PIMAModule, batch: Batch) -> list[str]:
    return [p for p in net.physics_names if p in batch.values]


def paired_rows(net: PIMAModule, batch: Batch) -> torch.Tensor:
    """(B,) bool: the rows with at least one physics modality observed."""
    return any_observed_rows(batch, _physics_in(net, batch), slice(0, batch.size))


def latent_cluster_log_posterior(
    net: PIMAModule, loc: torch.Tensor, log_var: torch.Tensor
) -> torch.Tensor:
    r""":math:`\log \tilde q(c \mid x_S)` (B, K) from the PoE posterior ``(loc, log_var)``
    of :math:`q(z \mid x_S)`, with the mixture held fixed (gradient to the encoders only)."""
    mix = net.mixture
    expected = expected_normal_log_prob(
        loc, torch.exp(log_var), mix.loc.detach(), mix.scale.detach()
    )
    return cluster_log_posterior_from_joint(net.plug_in_logits().detach() + expected)


def expert_cluster_log_posterior(
    net: PIMAModule, expert: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    r""":math:`\log \tilde q_d(c \mid x)` (B, K) from one data modality's own Gaussian
    ``expert`` ``(loc, log_var)``, combined with the prior expert as the guide does."""
    return latent_cluster_log_posterior(net, *combine_experts(net, {"expert": expert}, {}))


def encoder_cluster_log_posterior(net: PIMAModule, name: str, values: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \tilde q_d(c \mid x)` (B, K) for data modality ``name`` alone."""
    return expert_cluster_log_posterior(net, encode_experts(net, {name: values})[name])


def sharpened(log_q: torch.Tensor, temperature: float = SELF_TRAINING_TEMPERATURE) -> torch.Tensor:
    r"""The self-training target :math:`t_c \propto \tilde q_c^{1/T}` (B, K), without
    gradient."""
    return cluster_log_posterior_from_joint(log_q.detach() / temperature).exp()


def data_cluster_log_posterior(
    net: PIMAModule,
    batch: Batch,
    experts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    log_q: dict[str, torch.Tensor],
) -> torch.Tensor:
    r""":math:`\log \tilde q(c \mid x_D)` (B, K) from every observed data modality
    :math:`D` of a row, combining the ``experts`` already computed (no second encoder pass);
    with one data modality, that modality's own ``log_q``. Without gradient."""
    if len(experts) == 1:
        return next(iter(log_q.values())).detach()
    with torch.no_grad():
        return latent_cluster_log_posterior(net, *combine_experts(net, experts, batch.observed))


def paired_targets(
    net: PIMAModule, batch: Batch, log_q_data: torch.Tensor, data_evidence: float
) -> torch.Tensor:
    r"""The paired part's target (B, K), without gradient; meaningful on :func:`paired_rows`:

    .. math::

        r_{nc} \propto \pi_c^{1 - \lambda} \, \tilde q(c \mid x_{Dn})^{\lambda}
        \prod_p p(y_{pn} \mid c),

    with ``log_q_data`` = :math:`\log \tilde q(c \mid x_D)` (:func:`data_cluster_log_posterior`)
    and :math:`\lambda` = ``data_evidence`` in [0, 1]: the physics posterior
    :math:`p(c \mid y_n)` at 0, the posterior given the curve and the data modalities at 1
    (:math:`\tilde q` standing in for :math:`\pi_c\,p(x \mid c)`). No default: the training
    plan passes the ramp's factor (``Schedule.ramp_factor``). Inactive clusters have the
    finite ``EMPTY_LOG_WEIGHT`` in both terms, so the blend stays finite."""
    with torch.no_grad():
        log_prior = net.plug_in_logits().detach().expand_as(log_q_data)
        blend = data_evidence * log_q_data + (1.0 - data_evidence) * log_prior
        rows = slice(0, batch.size)
        physics = physics_cluster_log_likelihood(net, batch, _physics_in(net, batch), rows)
        return cluster_log_posterior_from_joint(blend + physics).exp()


def cross_modal_loss(
    net: PIMAModule,
    batch: Batch,
    cross_modal_weight: float = 1.0,
    self_training_weight: float = 1.0,
    data_evidence: float = 1.0,
) -> torch.Tensor:
    r""":math:`\frac{w_y}{B_y} \sum_{d,n \in y} \ell_{dn} + \frac{w_u}{B_u} \sum_{d,n \in u}
    \ell^{u}_{dn}`: the paired part averaged over the :math:`B_y` rows of the batch with a
    physics modality, weight :math:`w_y` = ``cross_modal_weight``, plus the self-training part
    averaged over the :math:`B_u` rows with a data modality and no physics one, weight
    :math:`w_u` = ``self_training_weight`` (0 when the model lacks either kind of modality).
    Means over each kind of row, not over the batch: a part's strength does not shrink with
    the fraction of samples paired (with 5% of the curves measured, a mean over the batch
    left the image encoder collapsed in every fit)."""
    total = torch.zeros((), device=batch.indices.device)
    names = [n for n in net.data_names if n in batch.values]
    if not has_cross_modal_term(net) or not names:
        return total
    paired = paired_rows(net, batch)
    unpaired = any_observed_rows(batch, names, slice(0, batch.size)) & ~paired
    experts = encode_experts(net, {n: batch.values[n] for n in names})
    log_q = {n: expert_cluster_log_posterior(net, e) for n, e in experts.items()}
    log_q_data = data_cluster_log_posterior(net, batch, experts, log_q)
    # a part with weight 0 is skipped, not multiplied by 0 (0 * inf would be NaN)
    if cross_modal_weight:
        # only the paired part needs the physics likelihood (every curve under every cluster)
        target = paired_targets(net, batch, log_q_data, data_evidence)
        total = total + _mean_cross_entropy(batch, log_q, target, paired, cross_modal_weight)
    if self_training_weight:
        target = sharpened(log_q_data)
        total = total + _mean_cross_entropy(batch, log_q, target, unpaired, self_training_weight)
    return total


def _mean_cross_entropy(
    batch: Batch,
    log_q: dict[str, torch.Tensor],
    target: torch.Tensor,
    rows: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    r"""``weight`` times the mean over the selected ``rows`` of
    :math:`-\sum_d \sum_c t_{nc} \log \tilde q_d(c \mid x_{dn})`, summed over the data
    modalities ``d`` observed on the row (0 with no row)."""
    per_row = weight / rows.sum().clamp_min(1)
    total = torch.zeros((), device=target.device, dtype=target.dtype)
    for name, log_q_d in log_q.items():
        on_rows = (batch.observed[name] & rows).to(log_q_d.dtype)
        total = total - ((target * log_q_d).sum(-1) * on_rows).sum() * per_row
    return total
