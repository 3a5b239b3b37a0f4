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

A row with none of the ``given`` modalities observed gets the mixture prior in every query:
:math:`p(c) = \pi`, :math:`z \sim \sum_c \pi_c \mathcal N(\mu_c, \sigma_c^2)` (its mean and
standard deviation for the latent representation).

What is exact and what is Monte Carlo (``S = num_samples`` draws of ``z``):

==========================================  =====================================================
query                                       computation
==========================================  =====================================================
p(c | physics modalities only or nothing)   exact (Bayes' rule over the enumerated c)
p(c | any data modality given)              randomised quasi-Monte Carlo over z ~ q(z | x_D),
                                            S = 256 by default; the physics factor stays exact
latent representation                       exact (the PoE Gaussian)
predict, physics target                     c ~ p(c | x_S) as above, then exact draws of y | c
predict, data target                        S draws z ~ q(z | x_S), x ~ p(x | z)
==========================================  =====================================================

Globals are plug-in values (:meth:`PIMAModule.point_globals`): the point estimates, or under
Bayesian globals the posterior mean of pi and the guide's centre for theta and noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pima_pyro.data import Batch
from pima_pyro.models.guide import encode
from pima_pyro.models.mixture import cluster_log_posterior_from_joint, log_mean_exp
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


def any_observed_rows(batch: Batch, names: Sequence[str], rows: slice) -> torch.Tensor:
    """(n,) bool: which rows have at least one of ``names`` observed."""
    size = rows.stop - rows.start
    if not names:
        return torch.zeros(size, dtype=torch.bool, device=batch.indices.device)
    return torch.stack([batch.observed[n][rows] for n in names]).any(0)


def mixture_moments(net: PIMAModule) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and standard deviation (D,) of the mixture prior :math:`\sum_c \pi_c
    \mathcal N(\mu_c, \sigma_c^2)`."""
    pi = net.plug_in_logits().exp()
    mix = net.mixture
    mean = pi @ mix.loc
    second = pi @ (mix.scale**2 + mix.loc**2)
    return mean, (second - mean**2).clamp_min(0).sqrt()


def sample_mixture_prior(
    net: PIMAModule, shape: tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draws of ``z`` from the mixture prior, ``(*shape, D)``."""
    pi = net.plug_in_logits().exp()
    c = torch.multinomial(pi, math.prod(shape), replacement=True, generator=generator)
    mix = net.mixture
    eps = torch.randn(
        (c.shape[0], net.latent_dim), device=pi.device, dtype=pi.dtype, generator=generator
    )
    return (mix.loc[c] + mix.scale[c] * eps).reshape(*shape, net.latent_dim)


@torch.no_grad()
def latent_posterior(
    net: PIMAModule, batch: Batch, given: Sequence[str], chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` (N, D) of :math:`q(z \\mid x_S)` for ``S = given``; rows with nothing
    given get the mixture prior's mean and standard deviation."""
    prior_loc, prior_scale = mixture_moments(net)
    locs, scales = [], []
    for sl in _chunks(batch.size, chunk):
        size = sl.stop - sl.start
        loc = prior_loc.expand(size, -1)
        scale = prior_scale.expand(size, -1)
        has_data = any_observed_rows(batch, given, sl)
        if given:
            values = {n: batch.values[n][sl] for n in given}
            masks = {n: batch.observed[n][sl] for n in given}
            q_loc, log_var = encode(net, values, masks)
            loc = torch.where(has_data[:, None], q_loc, loc)
            scale = torch.where(has_data[:, None], torch.exp(0.5 * log_var), scale)
        locs.append(loc)
        scales.append(scale)
    return torch.cat(locs), torch.cat(scales)


@torch.no_grad()
def cluster_log_posterior(
    net: PIMAModule,
    batch: Batch,
    given: Sequence[str],
    num_samples: int = 256,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """:math:`\\log p(c \\mid x_S)`, (N, K): Monte Carlo over ``num_samples`` draws of
    :math:`z \\sim q(z \\mid x_D)` when data modalities are given (``num_samples=0`` uses the
    mean of :math:`q`), exact otherwise."""
    data_given = [n for n in given if not net.is_physics(n)]
    physics_given = [n for n in given if net.is_physics(n)]
    out = []
    for sl in _chunks(batch.size, chunk):
        size = sl.stop - sl.start
        log_prior = net.plug_in_logits()
        log_pc = log_prior.expand(size, -1)
        if data_given:
            log_pc_data = _data_cluster_log_posterior(
                net, batch, data_given, sl, log_prior, num_samples, generator
            )
            has_data = any_observed_rows(batch, data_given, sl)
            log_pc = torch.where(has_data[:, None], log_pc_data, log_pc)
        log_pc = log_pc + physics_cluster_log_likelihood(net, batch, physics_given, sl)
        out.append(cluster_log_posterior_from_joint(log_pc))
    return torch.cat(out)


def physics_cluster_log_likelihood(
    net: PIMAModule, batch: Batch, names: Sequence[str], rows: slice
) -> torch.Tensor:
    r""":math:`\sum_p o_{np} \log p(y_{np} \mid c)` (n, K): the evidence the physics
    modalities ``names`` give about the cluster of each of the batch's ``rows``, each counted
    where it is observed (:math:`o_{np}` = 1); zeros when ``names`` is empty."""
    loc = net.mixture.loc
    size = len(range(*rows.indices(batch.size)))
    total = torch.zeros(size, net.n_clusters, device=loc.device, dtype=loc.dtype)
    for name in names:
        ll = net.modalities[name].cluster_log_likelihood(batch.values[name][rows])  # (n, K)
        total = total + ll * batch.observed[name][rows, None]
    return total


def standard_normal_qmc(
    num: int, dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(num, dim)`` scrambled-Sobol points mapped to standard-normal draws (float64, CPU);
    the scrambling seed comes from ``generator``."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=_cpu(generator), device="cpu"))
    with torch.device("cpu"):  # whatever the caller's default device (meta, cuda)
        engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
        uniform = engine.draw(num, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        return torch.special.ndtri(uniform)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """The generator if it is a CPU one; else a CPU generator seeded from it."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), device=generator.device, generator=generator))
    return torch.Generator(device="cpu").manual_seed(seed)


def _data_cluster_log_posterior(
    net: PIMAModule,
    batch: Batch,
    data_given: Sequence[str],
    sl: slice,
    log_prior: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    r""":math:`\log \frac1S \sum_s p(c \mid z_s)`, :math:`z_s \sim q(z \mid x_D)`: (n, K).

    The standard-normal draws behind :math:`z_s` are randomised quasi-Monte Carlo points
    (scrambled Sobol mapped through the normal quantile, shared by all rows): each estimate is
    unbiased like plain Monte Carlo, with an error that falls faster than
    :math:`1/\sqrt S` for the smooth, low-dimensional integrand.
    """
    values = {n: batch.values[n][sl] for n in data_given}
    masks = {n: batch.observed[n][sl] for n in data_given}
    loc, log_var = encode(net, values, masks)
    if num_samples > 0:
        eps = standard_normal_qmc(num_samples, net.latent_dim, generator).to(loc)
        z = loc + torch.exp(0.5 * log_var) * eps[:, None, :]  # (S, n, D)
    else:
        z = loc.unsqueeze(0)
    log_joint = net.mixture.component_log_prob(z, log_prior)  # (S, n, K)
    return log_mean_exp(cluster_log_posterior_from_joint(log_joint), dim=0)


def _latent_draws(
    net: PIMAModule,
    batch: Batch,
    given: Sequence[str],
    num_samples: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(S, n, D) draws of z from q(z | x_S), or from the mixture prior for rows with nothing
    given."""
    loc, scale = latent_posterior(net, batch, given)
    eps = torch.randn(
        (num_samples, *loc.shape), device=loc.device, dtype=loc.dtype, generator=generator
    )
    z = loc + scale * eps
    has_data = any_observed_rows(batch, given, slice(0, batch.size))
    if bool(has_data.all()):
        return z
    prior_z = sample_mixture_prior(net, (num_samples, batch.size), generator)
    return torch.where(has_data[None, :, None], z, prior_z)


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
            mean = probs @ module.cluster_means()
            c = torch.multinomial(probs, num_samples, replacement=True, generator=generator).T
            samples = module.likelihood(c).sample()  # (S, n, T)
        else:
            z = _latent_draws(net, part, given, num_samples, generator)
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
