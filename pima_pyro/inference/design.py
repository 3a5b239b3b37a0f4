r"""What to measure next: acquisition functions for self-driving labs.

For a sample with modalities :math:`x_S` observed and a physics modality :math:`y` not yet
measured, the expected information gain about its cluster is the mutual information

.. math::

    \mathrm{EIG}_n = I(c; y \mid x_S) = \mathbb H[p(c \mid x_S)]
        - \mathbb E_{y \sim p(y \mid x_S)} \mathbb H[p(c \mid x_S, y)].

In PIMA :math:`y \perp (x, z) \mid c`, so the update is exact over c:
:math:`p(c \mid x_S, y) \propto p(c \mid x_S)\, \mathcal N(y; f(t; \theta_c), s_c^2 I)`. The
expectation over :math:`y` is Monte Carlo: :math:`c_j \sim p(c \mid x_S)`,
:math:`y_j \sim p(y \mid c_j)`, ``num_samples`` draws, with the standard error of the mean
reported beside the estimate. Baselines: uncertainty sampling (the entropy
:math:`\mathbb H[p(c \mid x_S)]`, an upper bound of the EIG) and random choice.

About the physics (``about="physics"``, :func:`physics_parameter_gain`, under Bayesian
globals): the information the measurement carries about its cluster's parameters,
:math:`I(\theta_c; y \mid c, x_S) = \sum_c p(c \mid x_S)\, g_c` with, for the guide's
:math:`\theta_c = T(u_c)`, :math:`u_c \sim \mathcal N(m_c, \operatorname{diag} d_c^2)`,

.. math::

    g_c = \tfrac12 \log\det\bigl(I + s_c^{-2}\, D_c J_c^\top J_c D_c\bigr), \qquad
    J_c = \partial f(t; T(u)) / \partial u \,\big|_{u = m_c}, \quad D_c = \operatorname{diag} d_c,

the Gaussian update with the curve linearised at the guide's mean and the noise at the
guide's centre :math:`s_c`: exact for experts linear in :math:`\theta` on the real line (given
that noise), a first-order approximation otherwise. Mutual information does not depend on the
coordinates of :math:`\theta`; working in :math:`u`, where the guide is Gaussian, only decides
where the curve is linearised. It does not count what the measurement says about :math:`c`
itself (that is ``about="cluster"``). Inactive clusters get 0.

Batch selection (:func:`select_batch`) is greedy: each pick maximises
:math:`\mathrm{EIG}_n \,(1 - \max_{i \in \text{picked}} \mathrm{BC}(p_n, p_i))`, where
:math:`\mathrm{BC}(p, q) = \sum_c \sqrt{p_c q_c}` is the Bhattacharyya coefficient of the two
samples' cluster posteriors: a sample whose cluster belief duplicates one already picked is
discounted, so b picks are not b near-duplicates of the single best one.
"""

from __future__ import annotations

import numpy as np
import torch

from pima_pyro.models.mixture import cluster_log_posterior_from_joint
from pima_pyro.models.module import PIMAModule

#: What an expected information gain can be about: the sample's cluster, or its physics.
ABOUT = ("cluster", "physics")


def check_about(about: str) -> None:
    """Refuse an ``about`` that is not one of :data:`ABOUT`."""
    if about not in ABOUT:
        raise ValueError(f"about: must be one of {ABOUT}, got {about!r}")


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    r""":math:`-\sum_c p_c \log p_c` over the last dim (0 log 0 = 0)."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)


@torch.no_grad()
def physics_information_gain(
    net: PIMAModule,
    log_prior: torch.Tensor,
    measure: str,
    num_samples: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(eig, standard_error)``, each (N,), of measuring the physics modality ``measure`` for
    samples whose current cluster posterior is ``log_prior`` (N, K) = :math:`\log p(c \mid x_S)`.
    """
    if measure not in net.physics_names:
        raise ValueError(
            f"measure: '{measure}' is not a physics modality of the model "
            f"({list(net.physics_names)}); the exact update needs y independent of z given c"
        )
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    module = net.modalities[measure]
    n, k = log_prior.shape
    c = torch.multinomial(log_prior.exp().clamp_min(0), num_samples, True, generator=generator)
    means = module.cluster_means()[c]  # (N, J, T)
    scale = module.expert.noise_scale[c]  # (N, J)
    noise = torch.randn(means.shape, generator=generator, device=means.device, dtype=means.dtype)
    y = means + scale[..., None] * noise
    log_lik = module.cluster_log_likelihood(y.reshape(n * num_samples, -1)).reshape(
        n, num_samples, k
    )
    posterior = cluster_log_posterior_from_joint(log_prior[:, None, :] + log_lik)
    gains = entropy(log_prior)[:, None] - entropy(posterior)  # (N, J)
    return gains.mean(1), gains.std(1) / num_samples**0.5


def physics_parameter_gain(net: PIMAModule, measure: str) -> torch.Tensor:
    """:math:`g_c` (K,) of the module docstring: the information about cluster c's physics
    parameters from one measurement of ``measure`` on a sample known to be in c."""
    if not net.bayesian_globals:
        raise ValueError(
            "about='physics' needs bayesian_globals=True: with point estimates the physics "
            "parameters carry no uncertainty to reduce"
        )
    if measure not in net.physics_names:
        raise ValueError(
            f"measure: '{measure}' is not a physics modality of the model "
            f"({list(net.physics_names)})"
        )
    module = net.modalities[measure]
    expert = module.expert
    sd = expert.guide_theta_sd().detach()
    noise = expert.noise_scale.detach()
    jacobians = expert.curve_jacobian(expert.theta_unconstrained, module.grid)  # (K, T, P)
    scaled = jacobians * sd[:, None, :] / noise[:, None, None]
    eye = torch.eye(sd.shape[1], dtype=sd.dtype, device=sd.device)
    gain = 0.5 * torch.logdet(eye + scaled.transpose(1, 2) @ scaled)
    return torch.where(net.mixture.active, gain, torch.zeros_like(gain))


def select_batch(scores: np.ndarray, cluster_probs: np.ndarray, size: int) -> np.ndarray:
    """``size`` sample indices by the greedy, duplicate-discounting rule of the module
    docstring; ``scores`` (N,) >= 0, ``cluster_probs`` (N, K). Ties go to the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    probs = np.sqrt(np.clip(np.asarray(cluster_probs, dtype=np.float64), 0.0, None))
    if not 0 < size <= scores.size:
        raise ValueError(f"select_batch: size must be in [1, {scores.size}], got {size}")
    overlap = np.zeros(scores.size)
    picked: list[int] = []
    for _ in range(size):
        value = scores * (1.0 - overlap)
        value[picked] = -np.inf
        best = int(np.argmax(value))
        picked.append(best)
        overlap = np.maximum(overlap, probs @ probs[best])
    return np.array(picked)
