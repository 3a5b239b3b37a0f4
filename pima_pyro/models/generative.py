r"""The generative story as a Pyro ``model`` (DESIGN section 1).

For every sample :math:`n` in the (sub-sampled) ``data`` plate:

.. math::

    c_n &\sim \mathrm{Categorical}(\pi) && \text{(enumerated in parallel, never sampled)}\\
    z_n \mid c_n &\sim \mathcal N(\mu_{c_n}, \operatorname{diag}\sigma_{c_n}^2)\\
    x_{mn} \mid z_n &\sim p_m(x \mid \mathrm{decoder}_m(z_n)) && \text{data-driven } m\\
    y_{mn} \mid c_n &\sim \mathcal N(f_m(t_m; \theta_{m c_n}), s_{m c_n}^2 I) && \text{physics } m

A modality absent for sample :math:`n` is masked out of the likelihood (``poutine.mask``), never
imputed. Under ``TraceEnum_ELBO`` the site ``c`` is summed out exactly, so the physics likelihood
shapes the cluster posterior together with :math:`p(z \mid c)`. Sites: ``c``, ``z``,
``x_<name>`` (data modalities) and ``y_<name>`` (physics modalities).

With ``net.bayesian_globals`` the globals are random too (outside the plate):
:math:`\pi \sim \mathrm{Dirichlet}(\alpha)`, :math:`\theta_{mc} \sim p_m(\theta)` (the
expert's prior), :math:`s_{mc} \sim \mathrm{LogNormal}(0, \tau^2)`; sites ``pi``,
``theta_<name>``, ``noise_<name>`` (priors: :meth:`PIMAModule.global_prior_sites`).

:func:`physics_model` is the physics part of the same story (the globals always random, ``z``
and the data modalities left out, optionally replaced by a fixed per-sample evidence for ``c``):
the model that NUTS samples. Both functions share :func:`sample_globals` and
:func:`observe_physics`, so the two cannot drift apart.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.ops.indexing import Vindex

from pima_pyro.data import Batch
from pima_pyro.models.mixture import log_weights_of
from pima_pyro.models.module import PIMAModule

#: The only plate is ``data``; enumeration of ``c`` uses the dimension to its left.
MAX_PLATE_NESTING = 1


def site_name(net: PIMAModule, name: str) -> str:
    """Pyro site of modality ``name``: ``y_<name>`` for physics, ``x_<name>`` otherwise."""
    return f"y_{name}" if net.is_physics(name) else f"x_{name}"


def sample_globals(net: PIMAModule, bayesian: bool) -> dict[str, torch.Tensor]:
    """The global sites ``pi``, ``theta_<m>``, ``noise_<m>``: sampled from their priors when
    ``bayesian``, else the point estimates (``pyro.module`` parameters)."""
    if not bayesian:
        globals_ = {"pi": net.mixture.weights}
        for name in net.physics_names:
            expert = net.modalities[name].expert
            globals_[f"theta_{name}"] = expert.theta
            globals_[f"noise_{name}"] = expert.noise_scale
        return globals_
    draws = {site: pyro.sample(site, prior) for site, prior in net.global_prior_sites()}
    return net.with_fixed_globals(draws)


def observe_physics(
    net: PIMAModule, batch: Batch, c: torch.Tensor, globals_: dict[str, torch.Tensor]
) -> None:
    """``y_<m> | c ~ N(f_m(t_m; theta_mc), s_mc^2 I)`` for each physics modality in ``batch``
    (inside the ``data`` plate; unobserved entries masked)."""
    for name in net.physics_names:
        if name not in batch.values:
            continue
        likelihood = net.modalities[name].likelihood(
            c, globals_[f"theta_{name}"], globals_[f"noise_{name}"]
        )
        with poutine.mask(mask=batch.observed.get(name)):
            pyro.sample(f"y_{name}", likelihood, obs=batch.values[name])


def model(net: PIMAModule, batch: Batch) -> None:
    """Score every observed modality of ``batch`` under the PIMA generative story."""
    pyro.module("pima", net)
    globals_ = sample_globals(net, net.bayesian_globals)
    logits = (
        net.mixture.log_weights
        if not net.bayesian_globals
        else log_weights_of(globals_["pi"], net.mixture.active)
    )
    with pyro.plate("data", size=batch.n_total, subsample=batch.indices):
        c = pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        z = pyro.sample("z", net.mixture.component(c))
        for name in net.data_names:
            if name not in batch.values:
                continue
            with poutine.mask(mask=batch.observed.get(name)):
                pyro.sample(f"x_{name}", net.modalities[name].likelihood(z), obs=batch.values[name])
        observe_physics(net, batch, c, globals_)


def physics_model(
    net: PIMAModule, batch: Batch, cluster_log_evidence: torch.Tensor | None = None
) -> None:
    r"""The physics part of the story with random globals (no ``z``, no data modalities):

    .. math::

        \pi \sim \mathrm{Dirichlet},\ \theta_{mc} \sim p_m(\theta),\ s_{mc} \sim
        \mathrm{LogNormal};\quad c_n \sim \mathrm{Categorical}(\pi),\quad
        y_{mn} \mid c_n \sim \mathcal N(f_m(t_m; \theta_{m c_n}), s_{m c_n}^2 I)

    with ``c`` enumerated. ``cluster_log_evidence`` (N, K), when given, adds a fixed factor
    :math:`\ell_{nc} = \log p(x_{D,n} \mid c)` (up to a constant in c) per sample: the data
    modalities' evidence for the cluster from a fitted network. No ``pyro.module``: the
    networks and point estimates are constants here.
    """
    globals_ = sample_globals(net, bayesian=True)
    with pyro.plate("data", size=batch.n_total, subsample=batch.indices):
        c = pyro.sample(
            "c",
            dist.Categorical(logits=log_weights_of(globals_["pi"], net.mixture.active)),
            infer={"enumerate": "parallel"},
        )
        if cluster_log_evidence is not None:
            rows = torch.arange(cluster_log_evidence.shape[0], device=cluster_log_evidence.device)
            pyro.factor("data_evidence", Vindex(cluster_log_evidence)[rows, c])
        observe_physics(net, batch, c, globals_)
