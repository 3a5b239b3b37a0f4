r"""Posterior queries on a fitted :class:`~pima_pyro.models.module.PIMAModule`.

Given any subset :math:`S = D \cup P` of modalities (data-driven :math:`D`, physics :math:`P`):

* **cluster posterior** (exact over :math:`c`). Since :math:`y_P \perp x_D \mid c`,

  .. math::

      p(c \mid x_D, y_P) \propto p(c \mid x_D) \prod_{m \in P} \mathcal N(y_m; f_m(t_m;
      \theta_{mc}), s_{mc}^2 I),
      \qquad p(c \mid x_D) = \mathbb E_{p(z \mid x_D)}\big[p(c \mid z)\big]
      \approx \frac1S \sum_{s} p(c \mid z_s),\ z_s \sim q(z \mid x_D),

  with :math:`p(c \mid z) \propto \pi_c \mathcal N(z; \mu_c, \sigma_c^2)` and
  :math:`p(c \mid \emptyset) = \pi`. Physics-only queries are therefore exact Bayes' rule.
* **latent representation**: the PoE mean (and scale) of :math:`q(z \mid x_S)`.
* **cross-modal prediction** of a target modality: for a data modality,
  :math:`z_s \sim q(z \mid x_S)`, :math:`x_s \sim p(x \mid z_s)`; for a physics modality,
  :math:`c_s \sim p(c \mid x_S)`, :math:`y_s \sim \mathcal N(f(t; \theta_{c_s}), s_{c_s}^2)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pima_pyro.data import Batch
from pima_pyro.models.guide import encode
from pima_pyro.models.module import PIMAModule


@dataclass
class Prediction:
    """Cross-modal prediction of one modality: mean, equal-tailed interval and draws."""

    mean: torch.Tensor  # (N, *shape): posterior predictive mean
    lower: torch.Tensor  # (N, *shape)
    upper: torch.Tensor  # (N, *shape)
    samples: torch.Tensor | None  # (num_samples, N, *shape) draws, when asked for
    interval: float


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def latent_posterior(
    net: PIMAModule, batch: Batch, given: Sequence[str], chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` (N, D) of :math:`q(z \\mid x_S)` for ``S = given``."""
    locs, scales = [], []
    for sl in _chunks(batch.size, chunk):
        values = {n: batch.values[n][sl] for n in given}
        masks = {n: batch.observed[n][sl] for n in given}
        if values:
            loc, log_var = encode(net, values, masks)
        else:
            dtype = net.mixture.loc.dtype
            loc = torch.zeros(
                sl.stop - sl.start, net.latent_dim, device=batch.indices.device, dtype=dtype
            )
            log_var = torch.zeros_like(loc)
        locs.append(loc)
        scales.append(torch.exp(0.5 * log_var))
    return torch.cat(locs), torch.cat(scales)


@torch.no_grad()
def cluster_log_posterior(
    net: PIMAModule,
    batch: Batch,
    given: Sequence[str],
    num_samples: int = 64,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """:math:`\\log p(c \\mid x_S)`, (N, K). ``num_samples=0`` uses the mean of :math:`q`."""
    data_given = [n for n in given if not net.is_physics(n)]
    physics_given = [n for n in given if net.is_physics(n)]
    mixture = net.mixture
    out = []
    for sl in _chunks(batch.size, chunk):
        size = sl.stop - sl.start
        device = batch.indices.device
        log_prior = net.plug_in_logits()
        if data_given:
            values = {n: batch.values[n][sl] for n in data_given}
            masks = {n: batch.observed[n][sl] for n in data_given}
            loc, log_var = encode(net, values, masks)
            if num_samples > 0:
                eps = torch.randn(
                    (num_samples, *loc.shape), device=device, dtype=loc.dtype, generator=generator
                )
                z = loc + torch.exp(0.5 * log_var) * eps  # (S, n, D)
            else:
                z = loc.unsqueeze(0)
            log_pc_z = torch.log_softmax(mixture.component_log_prob(z, log_prior), -1)  # (S, n, K)
            log_pc = torch.logsumexp(log_pc_z, 0) - math.log(z.shape[0])
            # samples with none of the data modalities observed fall back to the prior
            has_data = torch.stack([masks[n] for n in data_given]).any(0)
            log_pc = torch.where(has_data[:, None], log_pc, log_prior.expand(size, -1))
        else:
            log_pc = log_prior.expand(size, -1)
        for name in physics_given:
            module = net.modalities[name]
            ll = module.likelihood().log_prob(batch.values[name][sl].unsqueeze(-2))  # (n, K)
            log_pc = log_pc + ll * batch.observed[name][sl, None]
        out.append(torch.log_softmax(log_pc, -1))
    return torch.cat(out)


@torch.no_grad()
def predict_modality(
    net: PIMAModule,
    batch: Batch,
    given: Sequence[str],
    target: str,
    num_samples: int = 200,
    interval: float = 0.9,
    generator: torch.Generator | None = None,
    return_samples: bool = True,
    max_elements: int = 8_000_000,
) -> Prediction:
    """Posterior predictive of ``target`` given the modalities ``given``.

    Samples are processed in chunks of at most ``max_elements`` drawn values, so that memory
    stays bounded for large targets (images) and many samples.
    """
    module = net.modalities[target]
    features = math.prod(module.spec.shape or (1,))
    chunk = max(1, max_elements // max(1, num_samples * features))
    alpha = (1.0 - interval) / 2.0
    means, lowers, uppers, draws = [], [], [], []
    for sl in _chunks(batch.size, chunk):
        part = batch.take(sl)
        if net.is_physics(target):
            probs = cluster_log_posterior(net, part, given, generator=generator).exp()  # (n, K)
            cluster_means = module.cluster_means()  # (K, T)
            scale = module.expert.noise_scale  # (K,)
            mean = probs @ cluster_means
            c = torch.multinomial(probs, num_samples, replacement=True, generator=generator).T
            noise = torch.randn(
                (*c.shape, cluster_means.shape[-1]),
                device=cluster_means.device,
                dtype=cluster_means.dtype,
                generator=generator,
            )
            samples = cluster_means[c] + scale[c].unsqueeze(-1) * noise  # (S, n, T)
        else:
            loc, scale = latent_posterior(net, part, given)
            eps = torch.randn(
                (num_samples, *loc.shape), device=loc.device, dtype=loc.dtype, generator=generator
            )
            z = loc + scale * eps
            mean = module.mean(z).mean(0)
            samples = module.likelihood(z).sample()
        q = torch.tensor([alpha, 1.0 - alpha], device=samples.device, dtype=samples.dtype)
        lower, upper = torch.quantile(samples, q, dim=0)
        means.append(mean)
        lowers.append(lower)
        uppers.append(upper)
        if return_samples:
            draws.append(samples)
    return Prediction(
        mean=torch.cat(means),
        lower=torch.cat(lowers),
        upper=torch.cat(uppers),
        samples=torch.cat(draws, dim=1) if return_samples else None,
        interval=interval,
    )
