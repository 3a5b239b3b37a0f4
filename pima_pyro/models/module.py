"""``PIMAModule``: every learnable piece of one PIMA model in one ``nn.Module``.

It holds the per-modality modules (encoders, decoders, likelihood scales, physics experts with
their grids) and the Gaussian-mixture prior. The Pyro ``model`` and ``guide`` functions take it as
their first argument, so that the same object works with ``pyro.module``, plain torch
optimisers, ``state_dict`` checkpoints and ``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro.distributions as dist
import torch
from torch import nn

from pima_pyro.models.experts import DEFAULT_PRIOR_SCALE
from pima_pyro.models.mixture import (
    GaussianMixturePrior,
    restrict_to_active,
)
from pima_pyro.models.modalities import (
    DataModalityModule,
    Modality,
    PhysicsModality,
    PhysicsModalityModule,
)


class PIMAModule(nn.Module):
    """Networks and global parameters of a PIMA model with ``n_clusters`` clusters."""

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        n_clusters: int,
        latent_dim: int,
        prior_expert: bool = True,
        bayesian_globals: bool = False,
        dirichlet_concentration: float = 1.0,
        noise_prior_scale: float = 2.0,
    ) -> None:
        super().__init__()
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.prior_expert = prior_expert
        self.bayesian_globals = bayesian_globals
        self.dirichlet_concentration = dirichlet_concentration
        self.noise_prior_scale = noise_prior_scale
        self.modality_names: tuple[str, ...] = tuple(modalities)
        self.modalities = nn.ModuleDict(
            {name: spec.build(name, latent_dim, n_clusters) for name, spec in modalities.items()}
        )
        self.mixture = GaussianMixturePrior(n_clusters, latent_dim)
        if bayesian_globals:
            # mean-field guide over pi and every expert's (theta, noise); the point-estimate
            # parameters (mixture.logits, expert.theta, expert.noise_scale) serve as its centre
            self.q_pi_log_concentration = nn.Parameter(torch.zeros(n_clusters))
            for name in self.physics_names:
                expert = self.modalities[name].expert
                expert.q_theta_log_sd = nn.Parameter(
                    torch.full((n_clusters, expert.num_params), -4.0)
                )
                expert.q_noise_log_sd = nn.Parameter(torch.full((n_clusters,), -4.0))

    # ---- globals ------------------------------------------------------------------------------
    def global_prior_sites(self) -> list[tuple[str, dist.Distribution]]:
        r"""The priors of the global sites, the one definition every path uses (the Pyro model
        under ``bayesian_globals``, the physics model that NUTS samples, the export):

        * ``pi`` ~ Dirichlet(:math:`\alpha` = ``dirichlet_concentration``), (K,);
        * ``theta_<m>`` ~ the expert's prior (:meth:`PhysicsExpert.prior`) per cluster, (K, P);
        * ``noise_<m>`` ~ LogNormal(0, ``noise_prior_scale``) per cluster, (K,).
        """
        ref = self.mixture.loc
        k = self.n_clusters
        alpha = torch.full((k,), self.dirichlet_concentration, dtype=ref.dtype, device=ref.device)
        # with one cluster pi = (1,) is not random: no site (a 1-simplex has no coordinates)
        sites: list[tuple[str, dist.Distribution]] = []
        if k > 1:
            sites.append(("pi", dist.Dirichlet(alpha)))
        for name in self.physics_names:
            expert = self.modalities[name].expert
            sites.append((f"theta_{name}", expert.prior().expand([k]).to_event(1)))
            zeros = torch.zeros(k, dtype=ref.dtype, device=ref.device)
            sites.append(
                (f"noise_{name}", dist.LogNormal(zeros, self.noise_prior_scale + zeros).to_event(1))
            )
        return sites

    def global_guide_sites(self) -> list[tuple[str, dist.Distribution]]:
        """The mean-field guide's distribution for each global site: Dirichlet for ``pi``, a
        Normal in the unconstrained coordinates of each expert's support (mapped through
        ``biject_to``) for ``theta_<m>``, LogNormal for ``noise_<m>``."""
        concentration = torch.exp(self.q_pi_log_concentration).clamp(1e-3, 1e8)
        sites: list[tuple[str, dist.Distribution]] = []
        if self.n_clusters > 1:
            sites.append(("pi", dist.Dirichlet(concentration)))
        for name in self.physics_names:
            expert = self.modalities[name].expert
            theta_sd = expert.guide_theta_sd()
            q_theta: dist.Distribution = dist.Normal(expert.theta_unconstrained, theta_sd).to_event(
                2
            )
            if not expert.is_unconstrained:
                q_theta = dist.TransformedDistribution(q_theta, [expert.theta_transform])
            sites.append((f"theta_{name}", q_theta))
            noise_sd = torch.exp(expert.q_noise_log_sd)
            sites.append(
                (
                    f"noise_{name}",
                    dist.LogNormal(torch.log(expert.noise_scale), noise_sd).to_event(1),
                )
            )
        return sites

    def with_fixed_globals(
        self, draws: Mapping[str, torch.Tensor], batch_shape: tuple[int, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """``draws`` of the global sites (leading dims ``batch_shape``) plus ``pi = 1`` of shape
        ``(*batch_shape, 1)`` when K = 1 (not a random site)."""
        out = dict(draws)
        if "pi" not in out:
            ref = self.mixture.loc
            out["pi"] = torch.ones(*batch_shape, 1, dtype=ref.dtype, device=ref.device)
        return out

    def point_globals(self) -> dict[str, torch.Tensor]:
        """Plug-in values of the global sites: the point estimates, or under
        ``bayesian_globals`` the guide's posterior mean of ``pi`` and its centre (the median,
        mapped to the support) for ``theta_<m>`` and ``noise_<m>``."""
        out = {"pi": self.plug_in_logits().exp()}
        for name in self.physics_names:
            expert = self.modalities[name].expert
            out[f"theta_{name}"] = expert.theta
            out[f"noise_{name}"] = expert.noise_scale
        return out

    @torch.no_grad()
    def init_global_guide(
        self, weights: torch.Tensor, n_samples: int, counts: dict[str, torch.Tensor] | None = None
    ) -> None:
        r"""Start the mean-field guide at a Laplace approximation around the current estimates.

        pi: Dirichlet with concentration :math:`\alpha + N \pi`. theta of cluster c: standard
        deviations :math:`s_c \sqrt{\operatorname{diag}(J^\top J)^{-1} / N_c}` with
        :math:`J = \partial f / \partial u` on the grid (u: the unconstrained coordinates of
        theta) and :math:`N_c` the cluster's (responsibility-weighted) count in
        ``counts[name]``; log noise:
        :math:`1 / \sqrt{2 N_c T}`.
        """
        if not self.bayesian_globals:
            return
        conc = self.dirichlet_concentration + n_samples * weights.to(self.mixture.loc)
        self.q_pi_log_concentration.copy_(torch.log(conc))
        if counts is None:
            return
        for name, (theta_cov, log_noise_sd) in self.laplace_scales(counts).items():
            expert = self.modalities[name].expert
            theta_sd = theta_cov.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
            expert.q_theta_log_sd.copy_(torch.log(theta_sd / expert.theta_scale))
            expert.q_noise_log_sd.copy_(log_noise_sd)

    @torch.no_grad()
    def laplace_scales(
        self, counts: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        r"""Approximate posterior covariances of each physics modality's globals at the
        current estimates, from ``counts[name]`` (K,), the cluster sizes :math:`N_c`:

        theta (K, P, P), in the unconstrained coordinates :math:`u` of the expert's support:
        :math:`(N_c J^\top J / s_c^2 + I / 10^2)^{-1}` with :math:`J =
        \partial f / \partial u` on the grid (the second term: the default prior's precision,
        which keeps a nearly empty cluster at its prior width); the log of the log noise's
        standard deviation (K,): :math:`-\tfrac12 \log(2 N_c T + 1/\tau^2)`, :math:`\tau` =
        ``noise_prior_scale``.
        """
        out = {}
        for name in self.physics_names:
            module = self.modalities[name]
            expert = module.expert
            n_c = counts[name].to(expert.theta_unit).clamp_min(0.0)
            grid = module.grid
            jac = expert.curve_jacobian(expert.theta_unconstrained, grid)  # (K, T, P)
            weight = (n_c / expert.noise_scale**2)[:, None, None]
            data_precision = jac.transpose(1, 2) @ jac * weight
            eye = torch.eye(data_precision.shape[-1], dtype=jac.dtype, device=jac.device)
            var = torch.linalg.inv(data_precision + eye / DEFAULT_PRIOR_SCALE**2)
            noise_precision = 2 * n_c * grid.shape[0] + 1.0 / self.noise_prior_scale**2
            out[name] = (var, -0.5 * torch.log(noise_precision))
        return out

    def plug_in_logits(self) -> torch.Tensor:
        r""":math:`\log\pi` used by queries: under Bayesian globals the log of the guide's
        posterior mean :math:`\alpha_c / \sum_{c'}\alpha_{c'}`, else the point estimate."""
        if self.bayesian_globals:
            return restrict_to_active(self.q_pi_log_concentration, self.mixture.active)
        return self.mixture.log_weights

    @property
    def physics_names(self) -> tuple[str, ...]:
        return tuple(
            n for n in self.modality_names if isinstance(self.modalities[n], PhysicsModalityModule)
        )

    @property
    def data_names(self) -> tuple[str, ...]:
        return tuple(
            n for n in self.modality_names if isinstance(self.modalities[n], DataModalityModule)
        )

    def is_physics(self, name: str) -> bool:
        return isinstance(self.modalities[name].spec, PhysicsModality)
