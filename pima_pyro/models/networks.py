"""Default encoders and decoders.

Every encoder maps one modality's features to a diagonal Gaussian expert over the latent
``z``: ``(loc, log_var)``, each (N, D). Every decoder maps ``z`` (..., D) to the parameters of
that modality's likelihood with the modality's feature shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """Fully connected layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Linear map from features to ``(loc, log_var)`` of a diagonal Gaussian."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(in_features, latent_dim)
        self.log_var = nn.Linear(in_features, latent_dim)
        # start near unit variance so early PoE weights are balanced across modalities
        nn.init.zeros_(self.log_var.weight)
        nn.init.zeros_(self.log_var.bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), self.log_var(h)


class MLPEncoder(nn.Module):
    """Flatten the features, then an MLP and a Gaussian head."""

    def __init__(self, feature_shape: tuple[int, ...], latent_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        in_features = math.prod(self.feature_shape)
        self.body = mlp([in_features, *hidden], activation=nn.SiLU)
        self.body.append(nn.SiLU())
        self.head = GaussianHead(hidden[-1] if hidden else in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x.flatten(-len(self.feature_shape))))


class MLPDecoder(nn.Module):
    """An MLP from ``z`` to the modality's feature shape."""

    def __init__(self, feature_shape: tuple[int, ...], latent_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.body = mlp([latent_dim, *reversed(hidden), math.prod(self.feature_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).unflatten(-1, self.feature_shape)


class ConvEncoder(nn.Module):
    """A small CNN for single-channel images (H, W): two stride-2 convolutions, then a head."""

    def __init__(self, feature_shape: tuple[int, ...], latent_dim: int, channels: int = 32):
        super().__init__()
        if len(feature_shape) != 2:
            raise ValueError(f"ConvEncoder expects an (H, W) image shape, got {feature_shape}")
        height, width = feature_shape
        self.feature_shape = (height, width)
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        out_h, out_w = (height + 3) // 4, (width + 3) // 4
        flat = 2 * channels * out_h * out_w
        self.fc = nn.Sequential(nn.Linear(flat, 256), nn.SiLU())
        self.head = GaussianHead(256, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = x.shape[:-2]
        h = self.conv(x.reshape(-1, 1, *self.feature_shape)).flatten(1)
        loc, log_var = self.head(self.fc(h))
        return loc.reshape(*batch_shape, -1), log_var.reshape(*batch_shape, -1)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder` with transposed convolutions; output cropped to (H, W)."""

    def __init__(self, feature_shape: tuple[int, ...], latent_dim: int, channels: int = 32):
        super().__init__()
        height, width = feature_shape
        self.feature_shape = (height, width)
        self.channels = channels
        self.out_h, self.out_w = (height + 3) // 4, (width + 3) // 4
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 256),
            nn.SiLU(),
            nn.Linear(256, 2 * channels * self.out_h * self.out_w),
            nn.SiLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(channels, 1, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1]))
        h = h.reshape(-1, 2 * self.channels, self.out_h, self.out_w)
        out = self.deconv(h)[:, 0, : self.feature_shape[0], : self.feature_shape[1]]
        return out.reshape(*batch_shape, *self.feature_shape)
