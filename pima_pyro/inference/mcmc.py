r"""NUTS over the physics-expert mixture, with the cluster summed out exactly.

Model (curves only; the amortised networks are not involved):

.. math::

    \pi \sim \mathrm{Dirichlet}(\alpha),\quad \theta_{mc} \sim p_m(\theta),\quad
    s_{mc} \sim \mathrm{LogNormal}(0, \tau^2),\quad
    p(y_n) = \sum_c \pi_c \prod_m \mathcal N(y_{mn}; f_m(t_m; \theta_{mc}), s_{mc}^2 I).

The sum over :math:`c` is the exact enumeration, written as one ``logsumexp`` so that NUTS sees
the marginal density; NUTS runs on a hand-written potential in unconstrained coordinates
(:class:`_Parameterisation`), which avoids Pyro's per-step tracing; the mass matrix is dense
(adapted in warm-up), which halved the tree size on the digits curves. For experts linear in
theta the squared residuals come from per-sample sufficient statistics (:math:`y^\top y`,
:math:`\Phi^\top y`), so each density evaluation costs O(N K P^2), not O(N K T).

Label switching: the clusters are identified by an ordering constraint on one parameter
(``order_by=(modality, parameter index)``, default the first parameter of the first physics
modality): that column is sampled as an ordered vector (``OrderedTransform`` of independent
:math:`\mathcal N(0, 10^2)` increments, a proper prior on the ordered values that replaces the
expert's prior for that one column). Every chain then explores the same mode and ``r_hat`` is
meaningful.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform
from pyro.infer import MCMC, NUTS

from pima_pyro.models.experts import PhysicsExpert


class _RecordingNUTS(NUTS):
    """NUTS that records, per iteration, the number of leapfrog steps and the energy."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.leapfrog_steps = 0
        self.start_energy: float | None = None

    def _build_basetree(self, z, r, z_grads, log_slice, direction, energy_current):
        if self.leapfrog_steps == 0:
            self.start_energy = float(energy_current)
        self.leapfrog_steps += 1
        return super()._build_basetree(z, r, z_grads, log_slice, direction, energy_current)


@dataclass
class MCMCResult:
    """Posterior draws grouped by chain: ``samples[name]`` is (chains, draws, ...)."""

    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray]  # diverging, tree_depth, n_steps, energy, lp
    param_names: dict[str, tuple[str, ...]]
    order_by: tuple[str, int]


def _sufficient_statistics(curves, masks, experts, grids):
    stats = {}
    for name, y in curves.items():
        expert = experts[name]
        if expert.is_linear:
            design = expert.design_matrix(grids[name].to(y))
            stats[name] = {
                "yy": (y**2).sum(-1),  # (N,)
                "phi_y": y @ design,  # (N, P)
                "gram": design.T @ design,  # (P, P)
            }
        else:
            stats[name] = {"y": y}
        stats[name]["mask"] = masks[name].to(y.dtype)
        stats[name]["T"] = y.shape[-1]
    return stats


class _Parameterisation:
    """Unconstrained coordinates of (pi, theta, noise) and the transforms back.

    * ``pi_u`` (K-1) -> pi by stick breaking (log-Jacobian added);
    * ``key_<m>`` (K) -> the ordered column by ``OrderedTransform`` (the prior is on the
      unconstrained increments, so no Jacobian);
    * ``theta_<m>`` (K, P) free columns (the ordered column excluded for the ordering modality);
    * ``log_noise_<m>`` (K) -> s = exp(u) (LogNormal prior = Normal on u, no Jacobian).
    """

    def __init__(self, experts, n_clusters, order_by, alpha, noise_prior_scale):
        self.experts = experts
        self.k = n_clusters
        self.order_by = order_by
        self.alpha = alpha
        self.noise_prior_scale = noise_prior_scale
        self.stick = dist.transforms.StickBreakingTransform()
        self.ordered = OrderedTransform()

    def constrain(self, u: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"pi": self.stick(u["pi_u"])}
        order_name, order_index = self.order_by
        for name, expert in self.experts.items():
            theta = u.get(f"theta_{name}")
            if name == order_name:
                key = self.ordered(u[f"key_{name}"])
                columns, j_rest = [], 0
                for j in range(len(expert.param_names)):
                    if j == order_index:
                        columns.append(key)
                    else:
                        columns.append(theta[..., j_rest])
                        j_rest += 1
                theta = torch.stack(columns, dim=-1)
            out[f"theta_{name}"] = theta
            out[f"noise_{name}"] = torch.exp(u[f"log_noise_{name}"])
        return out

    def log_prior(
        self, u: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        pi_u = u["pi_u"]
        alpha = torch.full((self.k,), self.alpha, dtype=pi_u.dtype)
        total = dist.Dirichlet(alpha).log_prob(c["pi"])
        total = total + self.stick.log_abs_det_jacobian(pi_u, c["pi"])
        order_name, _ = self.order_by
        for name, expert in self.experts.items():
            if name == order_name:
                total = total + dist.Normal(0.0, 10.0).log_prob(u[f"key_{name}"]).sum()
                if f"theta_{name}" in u:  # columns besides the ordered one
                    total = total + dist.Normal(0.0, 10.0).log_prob(u[f"theta_{name}"]).sum()
            else:
                total = total + expert.prior().log_prob(c[f"theta_{name}"]).sum()
            noise_prior = dist.Normal(0.0, self.noise_prior_scale)
            total = total + noise_prior.log_prob(u[f"log_noise_{name}"]).sum()
        return total


def mixture_log_likelihood(
    stats: Mapping[str, dict],
    experts: Mapping[str, PhysicsExpert],
    grids: Mapping[str, torch.Tensor],
    pi: torch.Tensor,
    theta: Mapping[str, torch.Tensor],
    noise: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """:math:`\\sum_n \\log \\sum_c \\pi_c \\prod_m p(y_{mn} \\mid c)` (c enumerated exactly)."""
    log_joint = None
    for name, s in stats.items():
        th, sd = theta[name], noise[name]
        if "gram" in s:
            sq = (
                s["yy"][:, None]
                - 2 * s["phi_y"] @ th.T
                + torch.einsum("kp,pq,kq->k", th, s["gram"], th)[None, :]
            )
        else:
            means = experts[name].expected_curve(th, grids[name])
            sq = ((s["y"][:, None, :] - means[None]) ** 2).sum(-1)
        ll = -0.5 * sq / sd**2 - s["T"] * (torch.log(sd) + 0.5 * math.log(2 * math.pi))
        ll = ll * s["mask"][:, None]
        log_joint = ll if log_joint is None else log_joint + ll
    assert log_joint is not None
    return torch.logsumexp(torch.log(pi.clamp_min(1e-300)) + log_joint, dim=-1).sum()


def physics_mcmc(
    curves: Mapping[str, torch.Tensor],
    experts: Mapping[str, PhysicsExpert],
    grids: Mapping[str, torch.Tensor],
    n_clusters: int,
    masks: Mapping[str, torch.Tensor] | None = None,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    order_by: tuple[str, int] | None = None,
    init_theta: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
    dirichlet_concentration: float = 1.0,
    noise_prior_scale: float = 2.0,
) -> MCMCResult:
    """Run ``num_chains`` NUTS chains (sequentially, float64, CPU) and return grouped draws.

    ``init_theta`` (e.g. the EM or SVI estimates) starts every chain near the mode, jittered per
    chain by 1% per chain index.
    """
    names = list(curves)
    if not names:
        raise ValueError("physics_mcmc: needs at least one physics modality")
    if n_clusters < 2:
        raise ValueError(f"physics_mcmc: n_clusters must be >= 2, got {n_clusters}")
    order_by = order_by or (names[0], 0)
    if order_by[0] not in curves:
        raise ValueError(f"physics_mcmc: order_by names unknown modality '{order_by[0]}'")
    y = {n: torch.as_tensor(v, dtype=torch.float64).cpu() for n, v in curves.items()}
    m = {
        n: (torch.ones(y[n].shape[0], dtype=torch.bool) if masks is None else masks[n].cpu())
        for n in names
    }
    t = {n: torch.as_tensor(grids[n], dtype=torch.float64).cpu() for n in names}
    experts = {n: _float64_copy(experts[n]) for n in names}
    stats = _sufficient_statistics(y, m, experts, t)
    param = _Parameterisation(
        experts, n_clusters, order_by, dirichlet_concentration, noise_prior_scale
    )

    def potential(u: Mapping[str, torch.Tensor]) -> torch.Tensor:
        c = param.constrain(u)
        log_lik = mixture_log_likelihood(
            stats,
            experts,
            t,
            c["pi"],
            {n: c[f"theta_{n}"] for n in names},
            {n: c[f"noise_{n}"] for n in names},
        )
        return -(log_lik + param.log_prior(u, c))

    draws: dict[str, list[np.ndarray]] = {}
    stat_names = ("diverging", "tree_depth", "n_steps", "energy", "lp")
    stat_draws: dict[str, list[np.ndarray]] = {k: [] for k in stat_names}
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + 1000 * chain)
        init = _initial_unconstrained(init_theta, experts, order_by, n_clusters, y, 0.01 * chain)
        kernel = _RecordingNUTS(potential_fn=potential, target_accept_prob=0.8, full_mass=True)
        per_draw: dict[str, list] = {k: [] for k in stat_names}
        seen_divergences: set[int] = set()

        def hook(kernel_, samples, stage, i, per_draw=per_draw, seen=seen_divergences):
            if stage == "Sample":
                steps = kernel_.leapfrog_steps
                per_draw["n_steps"].append(steps)
                per_draw["tree_depth"].append(int(math.ceil(math.log2(steps + 1))))
                per_draw["energy"].append(kernel_.start_energy)
                per_draw["lp"].append(-float(kernel_._potential_energy_last))
                new = set(kernel_._divergences) - seen
                per_draw["diverging"].append(bool(new))
                seen |= new
            kernel_.leapfrog_steps = 0

        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            num_chains=1,
            initial_params=init,
            hook_fn=hook,
            disable_progbar=not progress,
        )
        mcmc.run()
        with torch.no_grad():
            constrained = param.constrain(mcmc.get_samples())
        for name, value in constrained.items():
            draws.setdefault(name, []).append(value.numpy())
        for name, values in per_draw.items():
            stat_draws[name].append(np.asarray(values))
    return MCMCResult(
        samples={n: np.stack(v) for n, v in draws.items()},
        sample_stats={k: np.stack(v) for k, v in stat_draws.items()},
        param_names={n: tuple(experts[n].param_names) for n in names},
        order_by=order_by,
    )


def _float64_copy(expert: PhysicsExpert) -> PhysicsExpert:
    clone = copy.deepcopy(expert)
    if getattr(clone, "theta_unit", None) is None:
        clone.bind(1)
    return clone.double()


def _initial_unconstrained(init_theta, experts, order_by, n_clusters, y, jitter):
    """Unconstrained start: the given theta (sorted by the ordering key, jittered), noise at
    half the data's standard deviation, equal weights."""
    order_name, order_index = order_by
    start: dict[str, torch.Tensor] = {"pi_u": torch.zeros(n_clusters - 1, dtype=torch.float64)}
    for name, expert in experts.items():
        p = len(expert.param_names)
        if init_theta is not None and name in init_theta:
            theta = torch.as_tensor(init_theta[name], dtype=torch.float64).cpu().clone()
        else:
            theta = torch.linspace(-1.0, 1.0, n_clusters, dtype=torch.float64)[:, None].repeat(1, p)
        theta = theta + jitter * (theta.abs().mean() + 1e-3) * torch.randn_like(theta)
        if name == order_name:
            theta = theta[torch.argsort(theta[:, order_index])]
            key = theta[:, order_index] + torch.arange(n_clusters, dtype=torch.float64) * 1e-6
            start[f"key_{name}"] = OrderedTransform().inv(key)
            others = [j for j in range(p) if j != order_index]
            if others:
                start[f"theta_{name}"] = theta[:, others]
        else:
            start[f"theta_{name}"] = theta
        start[f"log_noise_{name}"] = torch.full(
            (n_clusters,), math.log(float(y[name].std()) / 2), dtype=torch.float64
        )
    return start
