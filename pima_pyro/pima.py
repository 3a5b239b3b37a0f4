"""``PIMA``: the class users meet, a thin layer over :mod:`pima_pyro.models` and
:mod:`pima_pyro.inference` (scvi-tools style: ``fit``, queries, ``save``/``load``)."""

from __future__ import annotations

import copy
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
import xarray as xr

from pima_pyro.data import MultimodalData
from pima_pyro.files import PIMAFileError, read_file, spec_from_data, spec_to_data, write_file
from pima_pyro.inference.design import (
    check_about,
    entropy,
    physics_information_gain,
    physics_parameter_gain,
)
from pima_pyro.inference.export import ExportOptions, to_arviz, to_datatree
from pima_pyro.inference.mcmc import MCMCResult, physics_nuts
from pima_pyro.inference.posterior import (
    Prediction,
    cluster_log_posterior,
    latent_posterior,
    predict_modality,
)
from pima_pyro.inference.svi import History, resolve_device
from pima_pyro.models.experts import PhysicsExpert, data_start
from pima_pyro.models.modalities import BernoulliModality, Modality, PhysicsModality
from pima_pyro.models.module import PIMAModule


def _package_version() -> str:
    from pima_pyro import __version__

    return __version__


def _check_curve_shape(
    name: str, expert: PhysicsExpert, curves: object, expected: tuple[int, int]
) -> None:
    label = f"modality '{name}': expert {type(expert).__name__}"
    if not isinstance(curves, torch.Tensor):
        raise TypeError(f"{label} must return a torch.Tensor, got {type(curves).__name__}")
    if tuple(curves.shape) != expected:
        raise ValueError(
            f"{label} returns curves of shape {tuple(curves.shape)}; expected {expected} "
            "(clusters, grid points)"
        )


def _finite_float(curves: torch.Tensor) -> bool:
    return curves.is_floating_point() and bool(torch.isfinite(curves).all())


def _non_finite_start(name: str, expert: PhysicsExpert, searched: bool) -> ValueError:
    where = ""
    if searched:
        held = " (the parameters in init held)" if bool(expert.user_start_mask.any()) else ""
        where = f" and at every start candidate tried{held}"
    return ValueError(
        f"modality '{name}': expert {type(expert).__name__} returns non-finite or non-float "
        f"values at its start theta {expert.theta[0].tolist()}{where}; give a start where the "
        "law is defined (Custom(init=...)) or a prior whose support excludes the bad region"
    )


def _curves_at_start(name: str, expert: PhysicsExpert, grid: torch.Tensor) -> object:
    """The expert's curves (K, T) at its current theta; a failing law is a ValueError
    naming the modality."""
    try:
        with torch.no_grad():
            return expert.expected_curve(expert.theta, grid)
    except Exception as exc:
        raise ValueError(
            f"modality '{name}': expert {type(expert).__name__} failed on the grid of "
            f"{grid.shape[0]} points: {exc}"
        ) from exc


def start_physics_expert(
    name: str, expert: PhysicsExpert, grid: torch.Tensor, mean_curve: torch.Tensor
) -> None:
    """Checks the bound ``expert``'s curves on ``grid`` at its start (type, shape, finite),
    once before training. Where a float law is not finite there, sets ``expert``'s theta in
    place to :func:`~pima_pyro.models.experts.data_start` (nearest the data's ``mean_curve``,
    the zero curve when no curve is observed; the entries the user gave kept). Raises
    ``TypeError``/``ValueError`` naming the modality when the law fails, has the wrong shape,
    or no finite start exists."""
    curves = _curves_at_start(name, expert, grid)
    _check_curve_shape(name, expert, curves, (expert.n_clusters, grid.shape[0]))
    assert isinstance(curves, torch.Tensor)
    if _finite_float(curves):
        return
    # integers are not a start problem, and a start the user gave in full is theirs to mend
    if not curves.is_floating_point() or bool(expert.user_start_mask.all()):
        raise _non_finite_start(name, expert, searched=False)
    try:
        start = data_start(expert, mean_curve, grid)
    except Exception as exc:
        raise ValueError(
            f"modality '{name}': expert {type(expert).__name__} is not finite at its start "
            f"and failed on a batch of start candidates (theta of shape (S, P)): {exc}"
        ) from exc
    if start is None:
        raise _non_finite_start(name, expert, searched=True)
    expert.set_theta(start.expand(expert.n_clusters, -1))
    curves = _curves_at_start(name, expert, grid)  # set_theta's round trip through the support
    if not (isinstance(curves, torch.Tensor) and _finite_float(curves)):
        raise _non_finite_start(name, expert, searched=True)


class PIMA:
    """A physics-informed multimodal autoencoder.

    Args:
        modalities: ``name -> Modality`` spec (:class:`~pima_pyro.GaussianModality`,
            :class:`~pima_pyro.BernoulliModality`, :class:`~pima_pyro.PhysicsModality`).
        n_clusters: number of mixture components K (>= 1).
        latent_dim: size of the latent z (>= 1).
        prior_expert: include the N(0, I) expert in the product of experts.
        bayesian_globals: put priors on pi (Dirichlet) and on every physics expert's theta and
            noise scale, and fit a mean-field guide for them beside the amortised PoE guide, so
            that :meth:`to_arviz` holds real posterior draws of the physics parameters.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        n_clusters: int = 10,
        latent_dim: int = 4,
        prior_expert: bool = True,
        bayesian_globals: bool = False,
    ) -> None:
        if not isinstance(modalities, Mapping) or not modalities:
            raise ValueError("PIMA: modalities must be a non-empty mapping name -> Modality spec")
        for name, spec in modalities.items():
            if not isinstance(spec, Modality):
                raise TypeError(
                    f"modality '{name}': expected a Modality spec (GaussianModality, "
                    f"BernoulliModality, PhysicsModality), got {type(spec).__name__}"
                )
            spec.validate(name)
        for arg, value in (("n_clusters", n_clusters), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"PIMA: {arg} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"PIMA: {arg} must be an integer >= 1, got {value!r}")
        n_clusters, latent_dim = int(n_clusters), int(latent_dim)
        self.specs: dict[str, Modality] = {n: copy.deepcopy(s) for n, s in modalities.items()}
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.prior_expert = prior_expert
        self.bayesian_globals = bayesian_globals
        self.module: PIMAModule | None = None
        self.history: History | None = None

    # ---- construction ------------------------------------------------------------------------
    def _check_data(self, data: MultimodalData, required: Sequence[str] | None = None) -> None:
        if not isinstance(data, MultimodalData):
            raise TypeError(f"expected MultimodalData, got {type(data).__name__}")
        for name in required if required is not None else self.specs:
            if name not in data.values:
                raise ValueError(
                    f"modality '{name}': missing from the data (data has {list(data.values)}); "
                    "pass it with a mask of False where it was not measured"
                )
        for name in data.values:
            if name not in self.specs:
                continue
            spec = self.specs[name]
            bounds = getattr(spec, "bounds", None)
            if bounds is not None:
                observed = data.values[name][data.masks[name]]
                if observed.numel() and (observed.min() < bounds[0] or observed.max() > bounds[1]):
                    raise ValueError(
                        f"modality '{name}': values must lie within bounds {tuple(bounds)}, got "
                        f"range [{float(observed.min()):.3g}, {float(observed.max()):.3g}]"
                    )
            if isinstance(spec, BernoulliModality):
                observed = data.values[name][data.masks[name]]
                if observed.numel() and (observed.min() < 0 or observed.max() > 1):
                    raise ValueError(
                        f"modality '{name}': a BernoulliModality needs values in [0, 1], got "
                        f"range [{float(observed.min()):.3g}, {float(observed.max()):.3g}]"
                    )
                if not spec.continuous and not torch.all((observed == 0) | (observed == 1)):
                    raise ValueError(
                        f"modality '{name}': BernoulliModality(continuous=False) needs 0/1 "
                        "values; use continuous=True for values in [0, 1]"
                    )
            if self.module is not None and name in data.grids and self.module.is_physics(name):
                trained = self.module.modalities[name].grid.cpu()
                if not torch.allclose(data.grids[name], trained.to(data.grids[name].dtype)):
                    raise ValueError(
                        f"modality '{name}': grid differs from the grid the model was fitted on "
                        f"(first points {trained[:3].tolist()} vs {data.grids[name][:3].tolist()})"
                    )
            shape = spec.shape
            if shape is not None and data.feature_shape(name) != tuple(shape):
                raise ValueError(
                    f"modality '{name}': feature shape {tuple(shape)} expected, data has "
                    f"{data.feature_shape(name)}"
                )

    def _build(self, data: MultimodalData) -> PIMAModule:
        self._check_data(data)
        for name, spec in self.specs.items():
            if spec.shape is None:
                spec.shape = data.feature_shape(name)
            if isinstance(spec, PhysicsModality) and len(spec.shape) != 1:
                raise ValueError(
                    f"modality '{name}': a physics modality is a curve (N, T); data has "
                    f"features {spec.shape}"
                )
            if isinstance(spec, PhysicsModality) and name not in data.grids:
                raise ValueError(
                    f"modality '{name}': a physics modality needs its grid t in "
                    "MultimodalData(grids={...})"
                )
        module = PIMAModule(
            self.specs,
            self.n_clusters,
            self.latent_dim,
            self.prior_expert,
            bayesian_globals=self.bayesian_globals,
        )
        for name in module.physics_names:
            physics = module.modalities[name]
            physics.grid.copy_(data.grids[name])
            curves = data.values[name][data.masks[name]]
            mean_curve = curves.mean(0) if len(curves) else torch.zeros_like(physics.grid)
            start_physics_expert(name, physics.expert, physics.grid, mean_curve)
        return module

    def build(self, data: MultimodalData) -> PIMAModule:
        """Create the networks and parameters for the shapes and grids of ``data`` (``fit``
        does this on first use; call it yourself to train with your own loop)."""
        self.module = self._build(data)
        return self.module

    def _require_fitted(self) -> PIMAModule:
        if self.module is None:
            raise RuntimeError("PIMA: call fit() (or load()) first")
        return self.module

    def _resolve_given(self, data: MultimodalData, given: Sequence[str] | None) -> list[str]:
        if given is None:
            given = [n for n in self.specs if n in data.values]
            if not given:
                raise ValueError(
                    f"data: none of its modalities {list(data.values)} is one of the model's "
                    f"{list(self.specs)}"
                )
        if isinstance(given, str):
            given = [given]
        given = list(given)
        if len(set(given)) != len(given):
            raise ValueError(f"given: each modality at most once, got {given}")
        for name in given:
            if name not in self.specs:
                raise ValueError(
                    f"given: unknown modality '{name}'; the model has {list(self.specs)}"
                )
            if name not in data.values:
                raise ValueError(
                    f"given: modality '{name}' is not in the data ({list(data.values)})"
                )
        self._check_data(data, required=given)
        return given

    @property
    def device(self) -> torch.device:
        return next(self._require_fitted().parameters()).device

    # ---- training ----------------------------------------------------------------------------
    def fit(self, data: MultimodalData, **options: object) -> History:
        """Fit by SVI with ``TraceEnum_ELBO`` on Lightning; returns (and keeps) the history.

        The options (``epochs``, ``batch_size``, ``lr``, ``device``, ``seed``, ``strategy``,
        ``devices``, checkpoints, validation, ...) are the fields of
        :class:`pima_pyro.inference.training.FitOptions`; every one is checked before the model
        is built. ``strategy="ddp"`` trains data-parallel on ``devices`` processes with
        ``batch_size`` samples each (Lightning's DDP: gloo on CPU, nccl on CUDA).

        Calling ``fit`` again continues from the trained networks (a warm start); the physics
        EM start runs again and the latent mixture's components are matched to its clusters,
        so encoders and physics keep pointing at the same clusters.
        """
        from pima_pyro.inference.training import fit, validated_options  # Lightning: on use

        if not isinstance(data, MultimodalData):
            raise TypeError(f"fit: expected MultimodalData, got {type(data).__name__}")
        seed = validated_options(dict(options), self.bayesian_globals).seed
        if self.n_clusters > data.n_samples:
            raise ValueError(
                f"PIMA: n_clusters={self.n_clusters} exceeds the {data.n_samples} samples"
            )
        torch.manual_seed(int(seed))  # network initialisation
        refit = self.history is not None  # trained (or loaded) before: align EM's clusters
        if self.module is None:
            self.module = self._build(data)
        else:
            self._check_data(data)
        unknown = [n for n in data.values if n not in self.specs]
        if unknown:
            warnings.warn(
                f"fit: modality(ies) {unknown} of the data are not in the model "
                f"({list(self.specs)}) and are ignored",
                stacklevel=2,
            )
        self.history = fit(self.module, data, refit=refit, **options)
        return self.history

    # ---- queries -----------------------------------------------------------------------------
    def cluster_posterior(
        self,
        data: MultimodalData,
        given: Sequence[str] | None = None,
        num_samples: int = 256,
        seed: int = 0,
    ) -> np.ndarray:
        """p(c | x_S) for every sample, (N, K); ``given=None`` uses every modality.

        Exact when only physics modalities are given; with a data modality, an average of
        p(c | z) over ``num_samples`` randomised quasi-Monte-Carlo draws z ~ q(z | x_D) (on the
        digits demo the largest standard deviation of a probability across query seeds was
        0.0061 at 256 draws, 0.014 at 64; ``benchmarks/query_mc_error.py``).
        """
        self._require_fitted()
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(
                f"cluster_posterior: num_samples must be an int >= 0, got {num_samples!r}"
            )
        return self._cluster_log_posterior(data, given, seed, num_samples).exp().cpu().numpy()

    def expected_information_gain(
        self,
        data: MultimodalData,
        measure: str = "curve",
        given: Sequence[str] | None = None,
        about: str = "cluster",
        num_samples: int = 256,
        seed: int = 0,
        return_se: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Expected information from measuring the physics modality ``measure`` of each sample
        (:mod:`pima_pyro.inference.design`): with ``about="cluster"`` the expected reduction
        of the entropy of p(c | ``given``) (exact over c, Monte Carlo over the predicted
        measurement). ``given`` defaults to every modality of
        the model in ``data`` but ``measure``; samples that already have ``measure`` get 0.
        With ``return_se`` also the Monte-Carlo standard errors. ``about="physics"``: the
        information about the sample's cluster's physics parameters under
        ``bayesian_globals=True`` (a linearised Gaussian update, no Monte Carlo: the standard
        errors are 0)."""
        check_about(about)
        net = self._require_fitted()
        if given is None:
            given = [n for n in self.specs if n in data.values and n != measure]
        log_prior = self._cluster_log_posterior(data, given, seed)
        if about == "physics":
            eig = log_prior.exp() @ physics_parameter_gain(net, measure).to(log_prior)
            se = torch.zeros_like(eig)
        else:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            eig, se = physics_information_gain(net, log_prior, measure, num_samples, gen)
        if measure in data.masks:
            done = data.masks[measure].to(eig.device)
            eig, se = torch.where(done, 0.0, eig), torch.where(done, 0.0, se)
        eig_np, se_np = eig.cpu().numpy(), se.cpu().numpy()
        return (eig_np, se_np) if return_se else eig_np

    def cluster_entropy(
        self, data: MultimodalData, given: Sequence[str] | None = None, seed: int = 0
    ) -> np.ndarray:
        """Entropy of p(c | ``given``) per sample (N,): the uncertainty-sampling score."""
        return entropy(self._cluster_log_posterior(data, given, seed)).cpu().numpy()

    def _cluster_log_posterior(
        self,
        data: MultimodalData,
        given: Sequence[str] | None,
        seed: int,
        num_samples: int = 256,
    ) -> torch.Tensor:
        """log p(c | ``given``), (N, K): the one body of every cluster query."""
        net = self._require_fitted()
        given = self._resolve_given(data, given)
        batch = data.with_modalities(given).to_batch(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return cluster_log_posterior(net, batch, given, num_samples, gen)

    def predict_clusters(
        self, data: MultimodalData, given: Sequence[str] | None = None
    ) -> np.ndarray:
        """The most probable cluster under :meth:`cluster_posterior`, (N,)."""
        return self.cluster_posterior(data, given).argmax(1)

    def get_latent_representation(
        self,
        data: MultimodalData,
        given: Sequence[str] | None = None,
        return_scale: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Mean (and optionally scale) of q(z | x_S), (N, latent_dim)."""
        net = self._require_fitted()
        given = self._resolve_given(data, given)
        batch = data.with_modalities(given).to_batch(self.device)
        loc, scale = latent_posterior(net, batch, given)
        if return_scale:
            return loc.cpu().numpy(), scale.cpu().numpy()
        return loc.cpu().numpy()

    def predict(
        self,
        data: MultimodalData,
        given: Sequence[str],
        target: str,
        num_samples: int = 200,
        interval: float = 0.9,
        seed: int = 0,
        return_samples: bool = False,
    ) -> Prediction:
        """Cross-modal prediction of ``target`` from ``given``: posterior predictive mean and
        equal-tailed ``interval``, and the ``num_samples`` draws when ``return_samples``."""
        net = self._require_fitted()
        if target not in self.specs:
            raise ValueError(
                f"target: unknown modality '{target}'; the model has {list(self.specs)}"
            )
        if not 0.0 < interval < 1.0:
            raise ValueError(f"predict: interval must be in (0, 1), got {interval}")
        if num_samples < 1:
            raise ValueError(f"predict: num_samples must be >= 1, got {num_samples}")
        given = self._resolve_given(data, given)
        batch = data.with_modalities(given).to_batch(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            pred = predict_modality(
                net, batch, given, target, num_samples, interval, gen, return_samples
            )
        return Prediction(
            mean=pred.mean.cpu(),
            lower=pred.lower.cpu(),
            upper=pred.upper.cpu(),
            samples=None if pred.samples is None else pred.samples.cpu(),
            interval=interval,
        )

    # ---- export and MCMC ---------------------------------------------------------------------
    def to_datatree(
        self,
        data: MultimodalData,
        num_samples: int = 500,
        seed: int = 0,
        posterior_predictive: bool = True,
        num_importance: int = 64,
        ppc_samples: int = 50,
        ppc_modalities: Sequence[str] | None = None,
        latents: bool = False,
        log_likelihood_terms: bool = False,
    ) -> xr.DataTree:
        """The ArviZ-schema ``xarray.DataTree`` (see :mod:`pima_pyro.inference.export`):
        ``num_samples`` draws of the globals in ``posterior``, the first ``ppc_samples`` of
        them replicating ``ppc_modalities`` (default all) in ``posterior_predictive``, the
        joint log-likelihood ``total`` (per modality too with ``log_likelihood_terms``), the
        latent mixture's point estimates in ``point_estimates`` and, with ``latents``, the
        per-sample ``z`` and ``cluster_probability`` in ``latent_posterior``.
        ``num_importance`` encoder draws per sample estimate the marginal log-likelihoods."""
        net = self._require_fitted()
        self._check_data(data)
        options = ExportOptions(
            ppc_samples=ppc_samples,
            ppc_modalities=None if ppc_modalities is None else tuple(ppc_modalities),
            latents=bool(latents),
            log_likelihood_terms=bool(log_likelihood_terms),
        )
        return to_datatree(
            net, data, num_samples, seed, posterior_predictive, num_importance, options
        )

    def to_arviz(self, data: MultimodalData, **options: Any) -> Any:
        """:meth:`to_datatree` (same options) in the installed ArviZ's type (DataTree for
        ArviZ >= 1.0, ``InferenceData`` for 0.x)."""
        return to_arviz(self.to_datatree(data, **options))

    def sample_physics_posterior(
        self,
        data: MultimodalData,
        num_samples: int = 500,
        warmup_steps: int = 500,
        num_chains: int = 4,
        seed: int = 0,
        order_by: tuple[str, int] | None = None,
        data_evidence: bool = False,
        init_scale: float = 3.0,
        progress: bool = False,
    ) -> MCMCResult:
        """NUTS over (pi, theta, noise) of the physics part of the model given the curves in
        ``data`` (:func:`pima_pyro.inference.mcmc.physics_nuts`): the priors of
        ``bayesian_globals=True``, ``c`` enumerated, clusters relabelled by ``order_by``,
        chains started from dispersed points around the fitted estimates.

        ``data_evidence=True`` adds each sample's evidence for its cluster from the data
        modalities (``log p(c | x_D) - log pi`` from the fitted network, fixed) as a factor.
        """
        net = self._require_fitted()
        physics = list(net.physics_names)
        if not physics:
            raise ValueError("sample_physics_posterior: the model has no physics modality")
        self._check_data(data, required=physics)
        evidence = None
        if data_evidence:
            data_given = [n for n in net.data_names if n in data.values]
            if not data_given:
                raise ValueError(
                    "sample_physics_posterior: data_evidence=True needs a data modality in data"
                )
            batch = data.with_modalities(data_given).to_batch(self.device)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            log_post = cluster_log_posterior(net, batch, data_given, 64, gen)
            evidence = (log_post - net.plug_in_logits()).detach().cpu()
        return physics_nuts(
            net,
            curves={p: data.values[p] for p in physics},
            masks={p: data.masks[p] for p in physics},
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            num_chains=num_chains,
            seed=seed,
            order_by=order_by,
            cluster_log_evidence=evidence,
            init_scale=init_scale,
            progress=progress,
        )

    # ---- fitted globals ----------------------------------------------------------------------
    def mixture_parameters(self) -> dict[str, np.ndarray]:
        """``weights`` (K,) (the posterior mean of pi under Bayesian globals, else the point
        estimate), ``loc`` (K, D), ``scale`` (K, D), ``active`` (K,) bool: ``False`` marks a
        cluster the start found surplus (weight exactly 0; see ``fit(prune_clusters=...)``)."""
        net = self._require_fitted()
        mix = net.mixture
        with torch.no_grad():
            return {
                "weights": net.plug_in_logits().exp().cpu().numpy(),
                "loc": mix.loc.cpu().numpy(),
                "scale": mix.scale.cpu().numpy(),
                "active": mix.active.cpu().numpy(),
            }

    def physics_parameters(self) -> dict[str, dict[str, np.ndarray]]:
        """Per physics modality: ``theta`` (K, P), ``noise_scale`` (K,), ``param_names``."""
        net = self._require_fitted()
        out = {}
        with torch.no_grad():
            for name in net.physics_names:
                expert = net.modalities[name].expert
                out[name] = {
                    "theta": expert.theta.detach().cpu().numpy(),
                    "noise_scale": expert.noise_scale.cpu().numpy(),
                    "param_names": np.array(expert.param_names),
                }
        return out

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the specs (as data), weights, history and versions to ``path`` atomically, with
        a SHA-256 digest (:mod:`pima_pyro.files`). A ``Custom`` expert must use a module-level
        function (it is stored by import path); otherwise a ``ValueError`` says so and nothing
        is written."""
        net = self._require_fitted()
        header = {
            "versions": {
                "pima_pyro": _package_version(),
                "torch": str(torch.__version__),
                "pyro": pyro.__version__,
            },
            "specs": {name: spec_to_data(name, spec) for name, spec in self.specs.items()},
            "n_clusters": self.n_clusters,
            "latent_dim": self.latent_dim,
            "prior_expert": self.prior_expert,
            "bayesian_globals": self.bayesian_globals,
            "history": None if self.history is None else self.history.as_dict(),
        }
        write_file(path, header, net.state_dict())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        map_location: str | torch.device = "cpu",
        experts: Mapping[str, PhysicsExpert] | None = None,
    ) -> PIMA:
        """Load a model written by :meth:`save`. The file is read with ``weights_only=True``
        (it cannot run code) and its digest checked; any unreadable, corrupted, foreign or
        newer file raises :class:`~pima_pyro.files.PIMAFileError` naming it. ``experts``
        re-supplies physics experts by modality name (a ``Custom`` whose function this process
        has not imported)."""
        device = resolve_device(map_location)
        header, state = read_file(path)
        try:
            written_by = str(header["versions"]["pima_pyro"])
            if int(written_by.split(".")[0]) > int(_package_version().split(".")[0]):
                raise PIMAFileError(
                    f"PIMA.load: {path} was written by pima-pyro {written_by}, newer than this "
                    f"{_package_version()}; upgrade pima-pyro to read it"
                )
            specs = {
                name: spec_from_data(name, data, experts or {})
                for name, data in header["specs"].items()
            }
            model = cls(
                specs,
                header["n_clusters"],
                header["latent_dim"],
                header["prior_expert"],
                bayesian_globals=header["bayesian_globals"],
            )
            history = History.from_dict(header["history"]) if header.get("history") else None
        except PIMAFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PIMAFileError(f"{path}: the header does not describe a model ({exc})") from exc
        model.module = PIMAModule(
            model.specs,
            model.n_clusters,
            model.latent_dim,
            model.prior_expert,
            bayesian_globals=model.bayesian_globals,
        )
        try:
            model.module.load_state_dict(state)
        except RuntimeError as exc:
            raise PIMAFileError(f"{path}: weights do not fit the specs ({exc})") from exc
        model.module.to(device).eval()
        model.history = history
        return model
