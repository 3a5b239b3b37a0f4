"""Every option combination of ``fit`` trains or is refused with a ValueError naming both
options (docs/options.md), and the queries agree on rows with nothing given."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.svi import initialize_from_physics

OBJECTIVES = ("elbo", "closed_form")
STRATEGIES = (None, "ddp")
JITS = (None, True, False)


def refusal(objective, bayesian, strategy, jit, checkpoint) -> tuple[str, str] | None:
    """The pair of options a combination is refused for (docs/options.md), or None."""
    if objective == "closed_form" and bayesian:
        return ("objective='closed_form'", "bayesian_globals=True")
    if objective == "closed_form" and jit is True:
        return ("objective='closed_form'", "jit=True")
    return None


@pytest.fixture(scope="module")
def small():
    return digits_affine(seed=0).subset(np.arange(96))


@pytest.mark.parametrize(
    "objective,bayesian,strategy,jit,checkpoint",
    list(itertools.product(OBJECTIVES, (False, True), STRATEGIES, JITS, (False, True))),
)
def test_option_combination_trains_or_is_refused(
    small, tmp_path, objective, bayesian, strategy, jit, checkpoint
):
    model = PIMA(
        affine_modalities(hidden=(16,)), n_clusters=4, latent_dim=2, bayesian_globals=bayesian
    )
    kwargs = {"objective": objective, "progress": False}
    if jit is not None:
        kwargs["jit"] = jit
    if checkpoint:
        kwargs["checkpoint_dir"] = str(tmp_path)
    expected = refusal(objective, bayesian, strategy, jit, checkpoint)
    if expected is not None:
        with pytest.raises(ValueError) as info:
            model.fit(small, epochs=2, batch_size=32, strategy=strategy, **kwargs)
        message = str(info.value)
        for option in expected:
            assert option.split("=")[0] in message, (option, message)
        return
    net_before = None
    if bayesian:  # the state after the EM start, before any gradient step
        start = copy.deepcopy(model.build(small))
        initialize_from_physics(start, small.to_batch(dtype=torch.float32), seed=0)
        net_before = {k: v.clone() for k, v in start.state_dict().items()}
    model.fit(small, epochs=2, batch_size=32, strategy=strategy, **kwargs)
    assert np.isfinite(model.history.loss).all()
    if bayesian:  # the variational globals are trained, not left at their start
        after = model.module.state_dict()
        assert not torch.equal(
            after["q_pi_log_concentration"], net_before["q_pi_log_concentration"]
        )
        key = "modalities.curve.expert.q_theta_log_sd"
        assert not torch.equal(after[key], net_before[key])
    if checkpoint:
        assert (tmp_path / "checkpoint.ckpt").exists()


def test_mixture_parameters_report_the_posterior_mean_of_pi_under_bayesian_globals(small):
    model = PIMA(affine_modalities(hidden=(16,)), n_clusters=4, latent_dim=2, bayesian_globals=True)
    model.fit(small, epochs=2, batch_size=32, progress=False)
    concentration = model.module.q_pi_log_concentration.detach().exp().numpy()
    np.testing.assert_allclose(
        model.mixture_parameters()["weights"], concentration / concentration.sum(), rtol=1e-5
    )


def test_rows_with_nothing_given_use_the_mixture_prior_in_every_query(small):
    model = PIMA(affine_modalities(hidden=(16,)), n_clusters=4, latent_dim=2)
    model.fit(small, epochs=3, batch_size=32, progress=False)
    data = small.subset(np.arange(20))
    masks = {"curve": np.arange(20) % 2 == 0}
    from pima_pyro.data import MultimodalData

    partial = MultimodalData(
        {k: v.numpy() for k, v in data.values.items()},
        grids={k: v.numpy() for k, v in data.grids.items()},
        masks=masks,
        labels=data.labels.numpy(),
    )
    missing = ~masks["curve"]
    mix = model.mixture_parameters()
    pi = mix["weights"]
    post = model.cluster_posterior(partial, given=["curve"])
    np.testing.assert_allclose(post[missing], np.broadcast_to(pi, post[missing].shape), rtol=1e-5)
    latent = model.get_latent_representation(partial, given=["curve"])
    np.testing.assert_allclose(
        latent[missing], np.broadcast_to(pi @ mix["loc"], (10, 2)), rtol=1e-5
    )
    # the predicted image of a row with nothing given is the mixture prior's predictive mean
    pred = model.predict(partial, given=["curve"], target="image", num_samples=4000, seed=0)
    with torch.no_grad():
        from pima_pyro.inference.posterior import sample_mixture_prior

        z = sample_mixture_prior(model.module, (20000,), torch.Generator().manual_seed(1))
        prior_mean = model.module.modalities["image"].mean(z).mean(0).numpy()
    rows = pred.mean[torch.as_tensor(missing)].numpy()
    np.testing.assert_allclose(rows, np.broadcast_to(prior_mean, rows.shape), atol=0.03)
