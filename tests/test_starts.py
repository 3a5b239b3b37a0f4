"""Starts that hold beyond the demo (issue 13): data-driven starts for every expert, the
unmoved-parameter warning, split-and-merge, BIC pruning with inactive clusters, the anchor
phase, and the ``digits_physics`` data set. Truths are simulated; every figure is checked
against the parameters that generated the data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pima_pyro import (
    PIMA,
    Custom,
    GaussianModality,
    LinearThroughOrigin,
    MultimodalData,
    PhysicsModality,
)
from pima_pyro.datasets import digits_physics
from pima_pyro.inference.initialization import (
    _EMData,
    em_from_responsibilities,
    physics_mixture_em,
    split_and_merge,
)
from pima_pyro.inference.svi import warn_unmoved_parameters
from pima_pyro.models.experts import start_candidates


def _power(t, a, p):
    return a * t**p


def _lines(slopes, n_per, noise, seed, t):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(slopes)).repeat_interleave(n_per)
    slopes = torch.as_tensor(slopes, dtype=torch.float64)
    y = slopes[labels, None] * t + noise * torch.randn(len(labels), len(t), generator=g)
    return y.double(), labels


def _damped_sine(t, a, w):
    return a * torch.sin(w * t)


def test_custom_expert_from_its_default_start_recovered_by_em():
    """No init: theta starts at (a, w) = (0, 0), where a sin(w t) has zero gradient in both
    parameters; gradient steps from there never move. The start search over prior draws must
    still find all three clusters."""
    expert = Custom(_damped_sine, {"a": (1,), "w": (1,)}).bind(3)
    t = torch.linspace(0.0, 3.0, 30, dtype=torch.float64)
    truth = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(60)
    y = expert.expected_curve(truth, t)[labels] + 0.1 * torch.randn(180, 30, generator=g).double()
    mask = torch.ones(180, dtype=torch.bool)
    res = physics_mixture_em({"y": y}, {"y": mask}, {"y": expert}, {"y": t}, n_clusters=3)
    theta = res.theta["y"] * torch.sign(res.theta["y"][:, :1])  # (a, w) and (-a, -w) agree
    got = theta[theta[:, 0].argsort()]
    np.testing.assert_allclose(got.numpy(), truth.numpy(), rtol=0.05)


def test_start_candidates_are_deterministic_inside_the_support_and_keep_the_init():
    import pyro.distributions as dist

    expert = Custom(
        _power,
        {"a": (1,), "p": (1,)},
        priors={"p": dist.LogNormal(torch.zeros(1), torch.ones(1)).to_event(1)},
        init={"a": [7.0], "p": [3.0]},
    ).bind(2)
    first = start_candidates(expert, seed=3)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(first, start_candidates(expert, seed=3))
    assert torch.equal(torch.rand(1), before)  # the global stream is untouched
    assert bool((first[:, 1] > 0).all())  # exponent keeps its positive support
    assert any(torch.allclose(row, torch.tensor([7.0, 3.0]).double()) for row in first)


def test_warning_names_a_parameter_em_never_moved():
    def flat_in_b(t, a, b):
        return a * t + 0.0 * b

    expert = Custom(flat_in_b, {"a": (1,), "b": (1,)}).bind(2)
    t = torch.linspace(0, 1, 10, dtype=torch.float64)
    y, _ = _lines([1.0, 4.0], 30, 0.1, 0, t)
    start = expert.theta.detach().clone()
    res = physics_mixture_em(
        {"y": y}, {"y": torch.ones(60, dtype=torch.bool)}, {"y": expert}, {"y": t}, 2
    )
    t32 = t.float()
    with pytest.warns(UserWarning, match=r"\['b'\] did not move"):
        warn_unmoved_parameters("y", expert, start, res.theta["y"].float(), t32)
    # an identified parameter left exactly at its start is reported too
    line = Custom(lambda t, a: a * t, {"a": (1,)}).bind(2)
    with pytest.warns(UserWarning, match=r"\['a'\]"):
        warn_unmoved_parameters("y", line, line.theta.detach(), line.theta.detach(), t32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unmoved_parameters("y", line, line.theta.detach(), res.theta["y"][:, :1].float(), t32)


def _em_data(y, t, expert):
    mask = torch.ones(y.shape[0], dtype=torch.bool)
    return _EMData(
        y={"y": y},
        m={"y": mask},
        t={"y": t},
        experts={"y": expert},
        any_observed=mask,
        floors={"y": 1e-6},
        max_iter=300,
        tol=1e-9,
    )


def test_split_and_merge_escapes_two_clusters_on_one_line():
    """Start: clusters 0 and 1 share the slope-0 samples, cluster 2 holds slopes 3 and 6
    together; EM keeps that local optimum, split-and-merge must reach slopes 0, 3, 6."""
    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    y, labels = _lines([0.0, 3.0, 6.0], 50, 0.3, 1, t)
    data = _em_data(y, t, LinearThroughOrigin())
    resp = torch.zeros(150, 3, dtype=torch.float64)
    resp[:25, 0] = resp[25:50, 1] = resp[50:, 2] = 1.0
    stuck = em_from_responsibilities(resp, data, torch.ones(3, dtype=torch.bool))
    assert sorted(stuck.theta["y"][:, 0].round().tolist()) != [0.0, 3.0, 6.0]
    fixed = split_and_merge(stuck, data, y.sum(1, keepdim=True).numpy())
    assert fixed.log_likelihood > stuck.log_likelihood + 100
    np.testing.assert_allclose(sorted(fixed.theta["y"][:, 0].tolist()), [0, 3, 6], atol=0.1)


def test_pruning_leaves_surplus_clusters_inactive_with_weight_exactly_zero():
    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    y, labels = _lines([0.0, 4.0], 80, 0.3, 2, t)
    mask = torch.ones(160, dtype=torch.bool)
    args = ({"y": y}, {"y": mask}, {"y": LinearThroughOrigin()}, {"y": t}, 4)
    kept = physics_mixture_em(*args)
    pruned = physics_mixture_em(*args, prune=True)
    assert kept.n_active == 4
    assert pruned.n_active == 2
    assert float(pruned.weights[~pruned.active].abs().max()) == 0.0
    assert float(pruned.responsibilities[:, ~pruned.active].max()) < 1e-30
    slopes = sorted(pruned.theta["y"][pruned.active, 0].tolist())
    np.testing.assert_allclose(slopes, [0.0, 4.0], atol=0.1)


def _line_data(n_per=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(2), n_per)
    x = rng.normal(size=(labels.size, 3)) + 3.0 * labels[:, None]
    t = np.linspace(0, 1, 10)
    y = (4.0 * labels)[:, None] * t + 0.2 * rng.normal(size=(labels.size, 10))
    return MultimodalData({"x": x, "y": y}, grids={"y": t}, labels=labels)


def _specs():
    return {
        "x": GaussianModality(hidden=(16,)),
        "y": PhysicsModality(expert=LinearThroughOrigin(), hidden=(16,)),
    }


def test_pruned_fit_reports_empty_clusters_and_every_query_gives_them_zero():
    """Pruning is the default: two true clusters fitted with K = 4 leave two inactive;
    ``prune_clusters=False`` keeps all four."""
    data = _line_data()
    kept = PIMA(_specs(), n_clusters=4, latent_dim=2)
    kept.fit(data, epochs=1, batch_size=40, seed=0, progress=False, prune_clusters=False)
    assert kept.mixture_parameters()["active"].sum() == 4
    model = PIMA(_specs(), n_clusters=4, latent_dim=2)
    model.fit(data, epochs=4, batch_size=40, seed=0, progress=False)
    mix = model.mixture_parameters()
    assert mix["active"].sum() == 2
    with torch.no_grad():  # even logits that drifted up leave an inactive cluster empty
        model.module.mixture.logits[torch.as_tensor(~mix["active"])] = 5.0
    mix = model.mixture_parameters()
    assert float(np.abs(mix["weights"][~mix["active"]]).max()) == 0.0
    for given in (None, ["x"]):
        prob = model.cluster_posterior(data, given=given)
        assert float(prob[:, ~mix["active"]].max()) < 1e-12
    with pytest.raises(ValueError, match="inactive clusters.*prune_clusters"):
        model.sample_physics_posterior(data, num_samples=2, warmup_steps=2, num_chains=1)


def test_anchor_phase_holds_experts_and_weights_then_frees_them():
    data = _line_data()
    model = PIMA(_specs(), n_clusters=2, latent_dim=2)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(epoch, step):
        net = model.module
        seen[epoch] = (
            net.modalities["y"].expert.theta.detach().clone(),
            net.mixture.logits.detach().clone(),
            net.mixture.loc.detach().clone(),
        )

    model.fit(
        data, epochs=6, batch_size=40, seed=0, progress=False, anchor_epochs=3, on_step=record
    )
    for epoch in (1, 2):  # anchored: only the latent mixture and the networks move
        assert torch.equal(seen[epoch][0], seen[0][0])
        assert torch.equal(seen[epoch][1], seen[0][1])
        assert not torch.equal(seen[epoch][2], seen[0][2])
    assert not torch.equal(seen[5][0], seen[2][0])
    assert not torch.equal(seen[5][1], seen[2][1])


def test_digits_physics_applies_the_law_sizes_and_hidden_fraction():
    law = LinearThroughOrigin().expected_curve
    grid = np.linspace(0, 1, 5)
    data = digits_physics(law, {1: [2.0], 3: [-1.0]}, grid, noise_std=0.0, sizes={1: 7, 3: 4})
    assert data.n_samples == 11
    labels = data.labels.numpy()
    assert sorted(set(labels.tolist())) == [1, 3]
    expected = np.where(labels == 1, 2.0, -1.0)[:, None] * grid
    np.testing.assert_allclose(data.values["curve"].numpy(), expected, atol=1e-6)
    hidden = digits_physics(law, {d: [float(d)] for d in range(10)}, grid, hide_fraction=0.5)
    assert abs(float(hidden.masks["curve"].float().mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="sizes"):
        digits_physics(law, {1: [2.0]}, grid, sizes={1: 10_000})


def test_compare_n_clusters_prefers_the_true_k_on_held_out_data():
    from pima_pyro.criticism import compare_n_clusters

    train, test = _line_data(n_per=60, seed=0), _line_data(n_per=30, seed=1)
    rows = compare_n_clusters(
        lambda k: PIMA(_specs(), n_clusters=k, latent_dim=2),
        train,
        test,
        [1, 2],
        num_samples=4,
        epochs=20,
        batch_size=40,
        seed=0,
        progress=False,
    )
    by_k = {int(r["n_clusters"]): r for r in rows}
    # two lines of slopes 0 and 4 under noise 0.2: one cluster must explain both, and the
    # held-out density of the curves alone drops by far more than the standard errors
    gap = by_k[2]["heldout_lpd"] - by_k[1]["heldout_lpd"]
    assert gap > 5 * (by_k[1]["heldout_lpd_se"] + by_k[2]["heldout_lpd_se"])
    assert by_k[2]["active"] == 2.0
    bayes = compare_n_clusters(
        lambda k: PIMA(_specs(), n_clusters=k, latent_dim=2, bayesian_globals=True),
        train,
        test,
        [2],
        num_samples=8,
        epochs=5,
        batch_size=40,
        seed=0,
        progress=False,
    )
    assert np.isfinite(bayes[0]["elpd_loo"]) and "elpd_loo" not in by_k[2]


def test_summary_features_are_standardised_principal_component_scores():
    from pima_pyro.inference.initialization import summary_features

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 9, generator=g) * torch.linspace(3.0, 0.2, 9)).reshape(200, 3, 3)
    observed = torch.ones(200, dtype=torch.bool)
    observed[:20] = False
    scores = summary_features(x, observed, n_components=2)
    rows = x.reshape(200, -1)[observed].double().numpy()
    centred = rows - rows.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    expected /= expected.std(0, ddof=1)
    got = scores[observed.numpy()]
    for j in range(2):  # principal directions are defined up to sign
        np.testing.assert_allclose(np.abs(got[:, j]), np.abs(expected[:, j]), atol=1e-6)
    assert np.all(scores[:20] == 0.0)


def test_summary_starts_reach_the_better_physics_optimum_on_close_decays():
    """Ten decays with rates 0.3..3.0 (the robustness benchmark's set, seed 1): EM from the
    per-curve starts alone stops 2.5 nats below the optimum that EM from the true labels
    reaches; starts proposed with the image summaries reach it (without the gated stage, whose
    parameters are chosen by another score: tests/test_gated_em.py)."""
    from pima_pyro import ExponentialDecay
    from pima_pyro.inference.initialization import summary_features

    rates = np.linspace(0.3, 3.0, 10)
    params = {d: [2.0, float(np.log(np.expm1(rates[d]))), 0.5] for d in range(10)}
    data = digits_physics(ExponentialDecay().expected_curve, params, np.linspace(0, 2, 20), 0.1, 1)
    train, _ = data.train_test_split(0.3, seed=1)
    args = (
        {"curve": train.values["curve"]},
        {"curve": train.masks["curve"]},
        {"curve": ExponentialDecay().bind(10)},
        {"curve": train.grids["curve"]},
        10,
    )
    alone = physics_mixture_em(*args, seed=1, split_merge=False)
    summaries = summary_features(train.values["image"], train.masks["image"])
    proposed = physics_mixture_em(
        *args, seed=1, split_merge=False, start_features=summaries, gate=False
    )
    y = train.values["curve"].double()
    em_data = _em_data(y, train.grids["curve"].double(), ExponentialDecay().bind(10))
    em_data.max_iter = 50
    truth = torch.nn.functional.one_hot(train.labels, 10).double()
    reference = em_from_responsibilities(truth, em_data, torch.ones(10, dtype=torch.bool))
    assert alone.log_likelihood < reference.log_likelihood - 1.0
    assert proposed.log_likelihood >= reference.log_likelihood - 0.1


def test_collapsed_encoder_is_measured_and_reported():
    from pima_pyro.inference.svi import encoder_information, warn_collapsed_encoders

    data = _line_data()
    model = PIMA(_specs(), n_clusters=2, latent_dim=2)
    net = model.build(data)
    batch = data.to_batch()
    x = batch.values["x"][batch.observed["x"]]
    loc, log_var = net.modalities["x"].encoder(x)
    expected = float(loc.var(0).mean() / torch.exp(log_var).mean())
    assert encoder_information(net, batch)["x"] == pytest.approx(expected, rel=1e-6)
    assert "y" not in encoder_information(net, batch)  # physics informs c exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_collapsed_encoders(net, batch)  # a random encoder still depends on its input
    with torch.no_grad():  # means that ignore the input
        net.modalities["x"].encoder.head.loc.weight.zero_()
    with pytest.warns(UserWarning, match=r"\['x'\] ignores its input"):
        warn_collapsed_encoders(net, batch)


def test_starts_searched_on_a_subsample_reach_the_full_search_optimum_on_every_row():
    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    y, labels = _lines([0.0, 2.0, 4.0, 6.0], 150, 0.5, 3, t)
    mask = torch.ones(y.shape[0], dtype=torch.bool)
    mask[::7] = False  # rows without a curve stay out of the subsample and start uniform
    args = ({"y": y}, {"y": mask}, {"y": LinearThroughOrigin()}, {"y": t}, 4)
    full = physics_mixture_em(*args, start_rows=None)
    sub = physics_mixture_em(*args, start_rows=60)
    assert sub.responsibilities.shape == full.responsibilities.shape == (y.shape[0], 4)
    assert sub.log_likelihood == pytest.approx(full.log_likelihood, rel=1e-6)
    np.testing.assert_allclose(
        sorted(sub.theta["y"][:, 0].tolist()), sorted(full.theta["y"][:, 0].tolist()), rtol=1e-5
    )


def test_a_start_search_smaller_than_k_is_refused():
    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    y, _ = _lines([0.0, 2.0, 4.0], 20, 0.5, 3, t)
    mask = torch.ones(y.shape[0], dtype=torch.bool)
    with pytest.raises(ValueError, match="start_rows must be >= n_clusters=3"):
        physics_mixture_em(
            {"y": y}, {"y": mask}, {"y": LinearThroughOrigin()}, {"y": t}, 3, start_rows=2
        )


def _peak(t, a, m, w):
    return a * torch.exp(-((t - m) ** 2) / (2 * w**2))


def _peak_data(seed=0):
    """Three clusters of Gaussian peaks: (a, m, w) = (1, 0.5, 0.3), (2, 1, 0.3), (3, 1.5, 0.3)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 40)
    t = np.linspace(0, 2, 20)
    a, m = 1.0 + labels, 0.5 + 0.5 * labels
    y = a[:, None] * np.exp(-((t - m[:, None]) ** 2) / (2 * 0.3**2))
    y = y + 0.05 * rng.normal(size=y.shape)
    x = rng.normal(size=(labels.size, 3)) + 3.0 * labels[:, None]
    return MultimodalData({"x": x, "y": y}, grids={"y": t}, labels=labels)


def _peak_model(**init):
    expert = Custom(_peak, {"a": (1,), "m": (1,), "w": (1,)}, init=init or None)
    specs = {
        "x": GaussianModality(hidden=(16,)),
        "y": PhysicsModality(expert=expert, hidden=(16,)),
    }
    return PIMA(specs, n_clusters=3, latent_dim=2)


def _nearest_finite_candidate(mean_curve, t, **init):
    """Brute force on a freshly bound expert (the candidates the build saw): the start
    candidate, with the given entries overwritten, of least squared distance to the mean curve
    among those with a finite curve."""
    expert = Custom(_peak, {"a": (1,), "m": (1,), "w": (1,)}, init=init or None).bind(3)
    candidates = start_candidates(expert, torch.float32)
    given = [i for i, name in enumerate("amw") if name in init]
    candidates[:, given] = expert.theta.detach()[0, given]
    curves = expert.expected_curve(candidates, t)
    distance = ((curves - mean_curve) ** 2).sum(-1)
    distance[~torch.isfinite(curves).all(-1)] = float("inf")
    return candidates[distance.argmin()]


def _ratio(t, a, w):
    return a * t / w


def test_law_undefined_at_the_default_start_starts_at_the_candidate_nearest_the_data():
    """A width at 0 makes the peak 0/0 at the default start: the model starts instead at the
    finite start candidate whose curve is nearest the data's mean curve (brute force), keeping
    the entries the user gave, and the fit recovers every peak. An init at a bad point in
    every parameter is refused, never replaced; a law that fails on a batch of candidates is
    a ValueError naming the modality."""
    data = _peak_data()
    t, mean_curve = data.grids["y"].float(), data.values["y"].mean(0)
    model = _peak_model()
    expert = model.build(data).modalities["y"].expert
    start = expert.theta.detach()
    torch.testing.assert_close(start[0], _nearest_finite_candidate(mean_curve, t))
    partial = _peak_model(a=[2.5]).build(data).modalities["y"].expert
    assert float(partial.theta.detach()[0, 0]) == 2.5
    torch.testing.assert_close(
        partial.theta.detach()[0], _nearest_finite_candidate(mean_curve, t, a=[2.5])
    )
    model.fit(data, epochs=2, batch_size=40, seed=0, progress=False)
    theta = model.physics_parameters()["y"]["theta"]
    theta[:, 2] = np.abs(theta[:, 2])  # the peak is even in w
    got = theta[np.argsort(theta[:, 0])]
    truth = np.array([[1.0, 0.5, 0.3], [2.0, 1.0, 0.3], [3.0, 1.5, 0.3]])
    np.testing.assert_allclose(got, truth, rtol=0.05)
    with pytest.raises(ValueError, match="modality 'y'.*non-finite") as refused:
        _peak_model(a=[1.0], m=[0.0], w=[0.0]).build(data)
    assert "candidate" not in str(refused.value)  # a start given in full is not searched
    held = Custom(_ratio, {"a": (1,), "w": (1,)}, init={"w": [0.0]})  # a t / 0 for every a
    specs = {"x": GaussianModality(), "y": PhysicsModality(expert=held)}
    with pytest.raises(ValueError, match=r"every start candidate tried \(the parameters in init"):
        PIMA(specs, n_clusters=3).build(data)

    def picky(t, a, w):
        assert a.shape[0] <= 3, "only K rows"
        return a / w * t

    specs = {
        "x": GaussianModality(),
        "y": PhysicsModality(expert=Custom(picky, {"a": (1,), "w": (1,)})),
    }
    with pytest.raises(ValueError, match="modality 'y'.*batch of start candidates.*only K rows"):
        PIMA(specs, n_clusters=3).build(data)
