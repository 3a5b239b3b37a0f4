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
``theta_<name>``, ``noise_<name>``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pima_pyro.data import Batch
from pima_pyro.models.module import PIMAModule

#: The only plate is ``data``; enumeration of ``c`` uses the dimension to its left.
MAX_PLATE_NESTING = 1


def site_name(net: PIMAModule, name: str) -> str:
    """Pyro site of modality ``name``: ``y_<name>`` for physics, ``x_<name>`` otherwise."""
    return f"y_{name}" if net.is_physics(name) else f"x_{name}"


def model(net: PIMAModule, batch: Batch) -> None:
    """Score every observed modality of ``batch`` under the PIMA generative story."""
    pyro.module("pima", net)
    mixture = net.mixture
    logits = mixture.logits
    globals_: dict[str, torch.Tensor] = {}
    if net.bayesian_globals:
        for site, prior in net.global_prior_sites():
            globals_[site] = pyro.sample(site, prior)
        logits = torch.log(globals_["pi"].clamp_min(torch.finfo(logits.dtype).tiny))
    with pyro.plate("data", size=batch.n_total, subsample=batch.indices):
        c = pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(mixture.loc[c], mixture.scale[c]).to_event(1))
        for name in net.modality_names:
            module = net.modalities[name]
            observed = batch.values.get(name)
            mask = batch.observed.get(name)
            if net.is_physics(name):
                likelihood = module.likelihood(
                    c, globals_.get(f"theta_{name}"), globals_.get(f"noise_{name}")
                )
            else:
                likelihood = module.likelihood(z)
            with poutine.mask(mask=mask):
                pyro.sample(site_name(net, name), likelihood, obs=observed)
