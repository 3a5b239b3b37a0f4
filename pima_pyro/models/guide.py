r"""The amortised guide: a product of Gaussian experts over the latent (DESIGN section 2).

.. math::

    q(z \mid x_S) = \mathcal N(\mu, \sigma^2), \quad
    \sigma^{-2} = [1] + \sum_{m \in S} \sigma_m^{-2}, \quad
    \mu\sigma^{-2} = \sum_{m \in S} \mu_m \sigma_m^{-2}

with :math:`S` the modalities the guide is told to encode for each sample
(``batch.encode``; by default every observed modality) and the bracketed 1 the optional
:math:`\mathcal N(0, I)` prior expert. Only ``z`` is sampled (reparameterised); ``c`` is left to
enumeration in the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch

from pima_pyro.data import Batch
from pima_pyro.models.module import PIMAModule
from pima_pyro.models.poe import poe_posterior


def encode_experts(
    net: PIMAModule, values: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each modality's own Gaussian expert ``(loc, log_var)`` (N, D), for the modalities of
    the model in ``values``, in the model's modality order; one encoder pass each."""
    return {
        name: net.modalities[name].encoder(values[name])
        for name in net.modality_names
        if name in values
    }


def _mask_or_everywhere(mask: torch.Tensor | None, locs: torch.Tensor) -> torch.Tensor:
    """``mask``, or all-True over the N rows of ``locs`` (M, N, D) when there is none."""
    if mask is None:
        return torch.ones(locs.shape[1], dtype=torch.bool, device=locs.device)
    return mask


def combine_experts(
    net: PIMAModule,
    experts: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    masks: Mapping[str, torch.Tensor],
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PoE posterior ``(loc, log_var)`` (N, D) of ``experts``, each present where its mask in
    ``masks`` says (everywhere when it has none or None). With no expert, zeros with
    ``reference``'s rows, device and dtype (a ``ValueError`` when it is not given)."""
    if not experts:
        if reference is None:
            raise ValueError("combine_experts: no expert and no reference tensor for the shape")
        zeros = torch.zeros(
            reference.shape[0], net.latent_dim, device=reference.device, dtype=reference.dtype
        )
        return zeros, zeros
    locs = torch.stack([loc for loc, _ in experts.values()])
    log_vars = torch.stack([log_var for _, log_var in experts.values()])
    present = torch.stack([_mask_or_everywhere(masks.get(name), locs) for name in experts])
    return poe_posterior(locs, log_vars, present, net.prior_expert)


def encode(
    net: PIMAModule,
    values: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """PoE posterior ``(loc, log_var)`` (N, D) from the modalities flagged in ``masks``.

    A modality missing from ``values`` is treated as unobserved for every sample; one missing
    from ``masks`` as observed for every sample.
    """
    reference = next(iter(values.values()))
    return combine_experts(net, encode_experts(net, values), masks, reference)


def latent_distribution(loc: torch.Tensor, log_var: torch.Tensor) -> dist.Distribution:
    r""":math:`q(z \mid x_S) = \mathcal N(\mu, \sigma^2)` from the PoE output; event (D,)."""
    return dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(1)


class GivenNoiseNormal(dist.Normal):
    """A Normal whose reparameterised draw is ``loc + scale * noise`` for given ``noise``.

    Same density as ``Normal(loc, scale)``; only the source of the standard-normal draw
    differs (common random numbers), which lets a batch split across processes reproduce a
    single-process step exactly.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> None:
        super().__init__(loc, scale)
        self.noise = noise

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        if tuple(sample_shape):
            raise ValueError("GivenNoiseNormal draws exactly one sample")
        return self.loc + self.scale * self.noise

    def expand(self, batch_shape, _instance=None):
        return GivenNoiseNormal(
            self.loc.expand(batch_shape),
            self.scale.expand(batch_shape),
            self.noise.expand(batch_shape),
        )


def guide(net: PIMAModule, batch: Batch) -> None:
    """Sample ``z`` from the PoE of the modalities in ``batch.encode`` (default: observed)."""
    pyro.module("pima", net)
    if net.bayesian_globals:
        for site, q in net.global_guide_sites():
            pyro.sample(site, q)
    masks = batch.encode if batch.encode is not None else batch.observed
    loc, log_var = encode(net, batch.values, masks)
    with pyro.plate("data", size=batch.n_total, subsample=batch.indices):
        if batch.noise is None:
            q = latent_distribution(loc, log_var)
        else:
            q = GivenNoiseNormal(loc, torch.exp(0.5 * log_var), batch.noise).to_event(1)
        pyro.sample("z", q)
