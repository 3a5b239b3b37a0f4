r"""Modality specifications and the per-modality modules built from them.

A *data-driven* modality :math:`x_m` is generated from the latent, :math:`x_m \mid z \sim
p_m(x \mid \mathrm{decoder}_m(z))`, with a Gaussian, Bernoulli or continuous-Bernoulli
likelihood. A *physics* modality :math:`y_m` on a grid :math:`t_m` is generated from the
cluster, :math:`y_m \mid c \sim \mathcal N(f_m(t_m; \theta_{mc}), s_{mc}^2 I)`. Every modality
has an encoder that contributes a Gaussian expert to the product-of-experts guide.

Specs are plain dataclasses (what the user writes); :meth:`Modality.build` turns one into an
``nn.Module`` once the latent size, the number of clusters and the feature shape are known.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

from pima_pyro.models.censored import CensoredNormal
from pima_pyro.models.experts import PhysicsExpert, cluster_log_likelihood, curve_likelihood
from pima_pyro.models.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

NETWORKS = ("mlp", "cnn")


@dataclass
class Modality:
    """Common fields: feature ``shape`` (inferred from data when ``None``), ``network`` kind
    (``"mlp"`` or ``"cnn"`` for (H, W) images) and MLP ``hidden`` sizes."""

    shape: tuple[int, ...] | None = None
    network: str = "mlp"
    hidden: tuple[int, ...] = (256, 128)
    kind: ClassVar[str] = "abstract"

    def validate(self, name: str) -> None:
        if self.network not in NETWORKS:
            raise ValueError(
                f"modality '{name}': network must be one of {NETWORKS}, got {self.network!r}"
            )
        if self.shape is not None:
            if not isinstance(self.shape, tuple | list):
                raise TypeError(
                    f"modality '{name}': shape must be a tuple of positive integers, got "
                    f"{self.shape!r} (an expert goes in expert=...)"
                )
            if not all(isinstance(s, int) and s > 0 for s in self.shape):
                raise ValueError(
                    f"modality '{name}': shape must be positive integers, got {self.shape!r}"
                )
        if self.network == "cnn" and self.shape is not None and len(self.shape) != 2:
            raise ValueError(
                f"modality '{name}': network='cnn' needs an (H, W) shape, got {self.shape!r}"
            )
        if not self.hidden or not all(isinstance(h, int) and h > 0 for h in self.hidden):
            raise ValueError(
                f"modality '{name}': hidden must be positive integers, got {self.hidden!r}"
            )

    def build_encoder(self, latent_dim: int) -> nn.Module:
        assert self.shape is not None
        if self.network == "cnn":
            return ConvEncoder(self.shape, latent_dim)
        return MLPEncoder(self.shape, latent_dim, self.hidden)

    def build_decoder(self, latent_dim: int) -> nn.Module:
        assert self.shape is not None
        if self.network == "cnn":
            return ConvDecoder(self.shape, latent_dim)
        return MLPDecoder(self.shape, latent_dim, self.hidden)

    def build(self, name: str, latent_dim: int, n_clusters: int) -> nn.Module:
        raise NotImplementedError


@dataclass
class GaussianModality(Modality):
    r""":math:`x \mid z \sim \mathcal N(\mathrm{decoder}(z), \varsigma^2 I)`.

    ``scale`` is the observation standard deviation :math:`\varsigma` in data units, fixed
    (a float) or learned (``None``; one scalar per modality, floored at 1e-3). It sets how much
    this modality's reconstruction weighs against the others and against the mixture prior: a
    small fixed scale on many pixels drowns a short physics curve (DESIGN section 8), so the
    defaults of the bundled data sets are fixed scales stated in their docstrings.

    ``bounds=(low, high)`` makes it the censored normal
    (:class:`~pima_pyro.models.censored.CensoredNormal`) for data that a measurement clips
    to a window, such as pixels in [0, 1]: values at a bound carry the probability of lying
    beyond it, and replicated data pile up at the bounds as the observed data do.
    """

    scale: float | None = 1.0
    bounds: tuple[float, float] | None = None
    kind: ClassVar[str] = "gaussian"

    def validate(self, name: str) -> None:
        super().validate(name)
        if self.bounds is not None and not (
            len(self.bounds) == 2 and float(self.bounds[0]) < float(self.bounds[1])
        ):
            raise ValueError(
                f"modality '{name}': bounds must be (low, high) with low < high, got "
                f"{self.bounds!r}"
            )
        if self.scale is not None and not (isinstance(self.scale, int | float) and self.scale > 0):
            raise ValueError(
                f"modality '{name}': scale must be a positive float or None (learned), "
                f"got {self.scale!r}"
            )

    def build(self, name: str, latent_dim: int, n_clusters: int) -> nn.Module:
        return DataModalityModule(
            self, self.build_encoder(latent_dim), self.build_decoder(latent_dim)
        )


@dataclass
class BernoulliModality(Modality):
    r""":math:`x \mid z \sim \mathrm{Bernoulli}(\sigma(\mathrm{decoder}(z)))` for binary data, or
    the continuous Bernoulli (``continuous=True``) for values in [0, 1] such as grey pixels."""

    continuous: bool = True
    kind: ClassVar[str] = "bernoulli"

    def build(self, name: str, latent_dim: int, n_clusters: int) -> nn.Module:
        return DataModalityModule(
            self, self.build_encoder(latent_dim), self.build_decoder(latent_dim)
        )


@dataclass
class PhysicsModality(Modality):
    r""":math:`y \mid c, t \sim \mathcal N(f(t; \theta_c), s_c^2 I)` with a per-cluster expert."""

    expert: PhysicsExpert | None = None
    hidden: tuple[int, ...] = (64, 64)
    kind: ClassVar[str] = "physics"

    def validate(self, name: str) -> None:
        super().validate(name)
        if not isinstance(self.expert, PhysicsExpert):
            raise TypeError(
                f"modality '{name}': a PhysicsModality needs expert=<PhysicsExpert>, "
                f"got {type(self.expert).__name__}"
            )
        if self.shape is not None and len(self.shape) != 1:
            raise ValueError(
                f"modality '{name}': a physics modality is a curve of shape (T,), "
                f"got {self.shape!r}"
            )
        if self.network != "mlp":
            raise ValueError(f"modality '{name}': a physics modality uses network='mlp'")

    def build(self, name: str, latent_dim: int, n_clusters: int) -> nn.Module:
        assert self.expert is not None and self.shape is not None
        # the spec keeps its expert unbound (picklable, reusable); the module owns a copy
        expert = copy.deepcopy(self.expert).bind(n_clusters)
        return PhysicsModalityModule(self, self.build_encoder(latent_dim), expert, self.shape[0])


class DataModalityModule(nn.Module):
    """Encoder, decoder and likelihood of one data-driven modality."""

    def __init__(self, spec: Modality, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.decoder = decoder
        self.event_dim = len(spec.shape or ())
        if isinstance(spec, GaussianModality) and spec.scale is None:
            self.unconstrained_scale = nn.Parameter(torch.zeros(()))
        else:
            self.unconstrained_scale = None

    @property
    def observation_scale(self) -> torch.Tensor | float | None:
        if not isinstance(self.spec, GaussianModality):
            return None
        if self.unconstrained_scale is not None:
            return nn.functional.softplus(self.unconstrained_scale) + 1e-3
        return float(self.spec.scale)  # type: ignore[arg-type]

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        """:math:`p(x \\mid z)` with the feature dims as event dims."""
        out = self.decoder(z)
        if isinstance(self.spec, GaussianModality):
            scale = self.observation_scale
            if not torch.is_tensor(scale):
                scale = torch.tensor(scale, dtype=out.dtype, device=out.device)
            scale = scale.expand_as(out)
            bounds = self.spec.bounds
            base: dist.Distribution = (
                dist.Normal(out, scale) if bounds is None else CensoredNormal(out, scale, *bounds)
            )
        elif isinstance(self.spec, BernoulliModality) and self.spec.continuous:
            # clamped logits: the normaliser of the continuous Bernoulli overflows in float32
            base = dist.ContinuousBernoulli(logits=out.clamp(-15.0, 15.0))
        else:
            base = dist.Bernoulli(logits=out)
        return base.to_event(self.event_dim)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`E[x \\mid z]`, the mean of :meth:`likelihood` (one definition of each)."""
        return self.likelihood(z).mean


class PhysicsModalityModule(nn.Module):
    """Encoder and per-cluster expert of one physics modality; holds its grid ``t``."""

    def __init__(
        self, spec: PhysicsModality, encoder: nn.Module, expert: PhysicsExpert, num_points: int
    ) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.expert = expert
        self.register_buffer("grid", torch.linspace(0.0, 1.0, num_points))

    def cluster_means(self) -> torch.Tensor:
        """:math:`f(t; \\theta_c)` for every cluster: (K, T)."""
        return self.expert(self.grid)

    def likelihood(
        self,
        c: torch.Tensor | None = None,
        theta: torch.Tensor | None = None,
        noise_scale: torch.Tensor | None = None,
    ) -> dist.Distribution:
        """:math:`p(y \\mid c)`; with ``c=None`` a batch over all K clusters.

        ``theta`` (K, P) and ``noise_scale`` (K,) default to the expert's point estimates (pass
        sampled values under Bayesian globals).
        """
        theta = self.expert.theta if theta is None else theta
        means = self.expert.expected_curve(theta, self.grid)
        scale = self.expert.noise_scale if noise_scale is None else noise_scale
        if c is not None:
            means, scale = means[c], scale[c]
        return curve_likelihood(means, scale)

    def cluster_log_likelihood(
        self,
        curves: torch.Tensor,
        theta: torch.Tensor | None = None,
        noise_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:math:`\\log p(y_n \\mid c)` for curves (N, T) and every cluster: (..., N, K).

        ``theta`` (..., K, P) and ``noise_scale`` (..., K) default to the point estimates;
        leading dims (draws of the globals) broadcast.
        """
        theta = self.expert.theta if theta is None else theta
        scale = self.expert.noise_scale if noise_scale is None else noise_scale
        means = self.expert.expected_curve(theta, self.grid)
        return cluster_log_likelihood(curves, means, scale)


__all__ = [
    "Modality",
    "GaussianModality",
    "BernoulliModality",
    "PhysicsModality",
    "DataModalityModule",
    "PhysicsModalityModule",
]
