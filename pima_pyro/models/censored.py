r"""The censored (Tobit) normal: a Gaussian observed through a window :math:`[l, u]`.

.. math::

    x = \min(\max(x^*, l), u), \qquad x^* \sim \mathcal N(\mu, \sigma^2),

so :math:`P(x = l) = \Phi((l - \mu)/\sigma)`, :math:`P(x = u) = 1 - \Phi((u - \mu)/\sigma)` and
:math:`x` has the normal density strictly inside. ``log_prob`` is taken with respect to
Lebesgue measure plus atoms at the two bounds. It suits pixels in [0, 1] that pile up at 0
and 1: replicated data pile up there too, which a plain Gaussian (mass outside [0, 1]) and the
continuous Bernoulli (no mass at 0 or 1) both fail to do.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints


class CensoredNormal(dist.TorchDistribution):
    """Elementwise censored normal with bounds ``low < high`` (floats)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        low: float,
        high: float,
        validate_args: bool | None = None,
    ) -> None:
        if not low < high:
            raise ValueError(f"CensoredNormal: needs low < high, got {low} and {high}")
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.low, self.high = float(low), float(high)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.interval(self.low, self.high)

    def expand(self, batch_shape, _instance=None) -> CensoredNormal:
        shape = torch.Size(batch_shape)
        return CensoredNormal(self.loc.expand(shape), self.scale.expand(shape), self.low, self.high)

    def _standardised(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.low - self.loc) / self.scale, (self.high - self.loc) / self.scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        a, b = self._standardised()
        inside = dist.Normal(self.loc, self.scale).log_prob(value)
        at_low = torch.special.log_ndtr(a)
        at_high = torch.special.log_ndtr(-b)
        return torch.where(
            value <= self.low, at_low, torch.where(value >= self.high, at_high, inside)
        )

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            latent = dist.Normal(self.loc, self.scale).sample(sample_shape)
            return latent.clamp(self.low, self.high)

    @property
    def mean(self) -> torch.Tensor:
        r""":math:`E[x] = l\Phi(a) + u(1 - \Phi(b)) + \mu(\Phi(b) - \Phi(a)) + \sigma(\varphi(a)
        - \varphi(b))` with :math:`a, b` the standardised bounds."""
        a, b = self._standardised()
        cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
        pdf_a = torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
        pdf_b = torch.exp(-0.5 * b**2) / math.sqrt(2 * math.pi)
        return (
            self.low * cdf_a
            + self.high * (1 - cdf_b)
            + self.loc * (cdf_b - cdf_a)
            + self.scale * (pdf_a - pdf_b)
        )
