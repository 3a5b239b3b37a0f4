"""The cross-modal cluster term against a hand computation, and what its gradient reaches."""

import math

import numpy as np
import pytest
import torch

from pima_pyro.data import Batch
from pima_pyro.inference.cross_modal import cross_modal_loss, encoder_cluster_log_posterior
from pima_pyro.inference.posterior import cluster_log_posterior
from pima_pyro.models.experts import Affine
from pima_pyro.models.modalities import GaussianModality, PhysicsModality
from pima_pyro.models.module import PIMAModule

from .helpers import tiny_batch, tiny_module


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(-1, keepdims=True)
    return np.exp(a) / np.exp(a).sum(-1, keepdims=True)


def _by_hand(net, batch, data_evidence: float = 1.0) -> tuple[float, float]:
    """``(paired part, self-training part)``: the PoE with the N(0, I) expert, the expected
    component log-density, Bayes' rule on the physics likelihood times q(c | x) to the power
    ``data_evidence`` (pi to the rest), the sharpening and the two cross-entropies, in numpy."""
    with torch.no_grad():
        log_pi = net.mixture.log_weights.numpy()
        expert = net.modalities["y"].expert
        means = expert.expected_curve(expert.theta, net.modalities["y"].grid).numpy()  # (K, T)
        noise = expert.noise_scale.numpy()  # (K,)
        m_x, log_v_x = (t.numpy() for t in net.modalities["x"].encoder(batch.values["x"]))
        mu, sigma = net.mixture.loc.numpy(), net.mixture.scale.numpy()
    y = batch.values["y"].numpy()
    resid = y[:, None, :] - means[None]  # (N, K, T)
    ll = (-0.5 * (resid / noise[None, :, None]) ** 2 - np.log(noise)[None, :, None]).sum(-1)
    ll = ll - 0.5 * y.shape[1] * math.log(2 * math.pi)
    precision = 1.0 + np.exp(-log_v_x)
    var = 1.0 / precision
    loc = m_x * np.exp(-log_v_x) * var
    expected = -0.5 * (
        np.log(2 * math.pi * sigma**2)[None]
        + (var[:, None] + (loc[:, None] - mu[None]) ** 2) / sigma[None] ** 2
    ).sum(-1)
    log_q = np.log(_softmax(log_pi + expected))
    r = _softmax(data_evidence * log_q + (1.0 - data_evidence) * log_pi + ll)
    x_seen, y_seen = batch.observed["x"].numpy(), batch.observed["y"].numpy()
    paired, unpaired = x_seen & y_seen, x_seen & ~y_seen
    sharp = _softmax(2.0 * log_q)  # q^(1/T), T = 1/2
    on_pairs = -((r * log_q).sum(-1) * paired).sum() / y_seen.sum()
    on_rest = -((sharp * log_q).sum(-1) * unpaired).sum() / unpaired.sum()
    return float(on_pairs), float(on_rest)


def _vague_physics_module() -> PIMAModule:
    """``tiny_module`` with noisier curves, so that x's evidence moves the paired target."""
    net = tiny_module()
    with torch.no_grad():
        net.modalities["y"].expert.unconstrained_noise.add_(3.0)
    return net


@pytest.mark.parametrize("data_evidence", [0.0, 0.4, 1.0])
def test_cross_modal_loss_equals_the_hand_computed_cross_entropies(data_evidence):
    """Paired rows: cross-entropy to the posterior given the curve and, to the power
    ``data_evidence``, x; rows with x and no y: to the sharpened posterior of x (tiny_batch
    has both kinds)."""
    net = _vague_physics_module()
    batch = tiny_batch(net)
    on_pairs, on_rest = _by_hand(net, batch, data_evidence)
    assert on_pairs > 0 and on_rest > 0  # the fixture has rows of both kinds
    assert abs(on_pairs - _by_hand(net, batch, 1.0 - data_evidence)[0]) > 1e-3 * on_pairs
    loss = cross_modal_loss(net, batch, 1.0, 1.0, data_evidence)
    assert float(loss.detach()) == pytest.approx(on_pairs + on_rest, rel=1e-10)


def test_without_a_pair_a_row_gets_the_sharpened_self_training_term_alone():
    net = tiny_module()
    batch = tiny_batch(net)
    batch.observed["y"] = torch.zeros_like(batch.observed["y"])
    _, on_rest = _by_hand(net, batch)
    assert float(cross_modal_loss(net, batch).detach()) == pytest.approx(on_rest, rel=1e-10)
    batch.observed["x"] = torch.zeros_like(batch.observed["x"])
    assert float(cross_modal_loss(net, batch).detach()) == 0.0


def _entropy(log_q: torch.Tensor) -> torch.Tensor:
    return -(log_q.exp() * log_q).sum(-1)


def test_self_training_moves_an_unpaired_row_towards_its_likelier_cluster():
    """The gradient of the sharpened term raises the favoured cluster's probability (the
    sharpened target puts more mass on it than q does), so entropy falls."""
    net = tiny_module()
    batch = tiny_batch(net)
    batch.observed["y"] = torch.zeros_like(batch.observed["y"])
    rows = batch.observed["x"]
    log_q = encoder_cluster_log_posterior(net, "x", batch.values["x"]).detach()[rows]
    favoured = log_q.argmax(1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        cross_modal_loss(net, batch).backward()
        optimizer.step()
    after = encoder_cluster_log_posterior(net, "x", batch.values["x"]).detach()[rows]
    assert torch.equal(after.argmax(1), favoured)
    gain = after.gather(1, favoured[:, None]) - log_q.gather(1, favoured[:, None])
    assert bool((gain > 0).all())
    assert bool((_entropy(after) < _entropy(log_q)).all())


def test_the_self_training_target_is_held_fixed():
    """Its gradient is that of the cross-entropy to a constant sharpened target: with the
    target's own gradient the encoder would also be pushed to make q^2 match q."""
    net = tiny_module()
    batch = tiny_batch(net)
    batch.observed["y"] = torch.zeros_like(batch.observed["y"])
    cross_modal_loss(net, batch).backward()
    got = [p.grad.clone() for p in net.modalities["x"].encoder.parameters()]
    net.zero_grad()
    rows = batch.observed["x"].double()
    log_q = encoder_cluster_log_posterior(net, "x", batch.values["x"])
    target = torch.softmax(2.0 * log_q, -1).detach()
    (-((target * log_q).sum(-1) * rows).sum() / rows.sum()).backward()
    for g, p in zip(got, net.modalities["x"].encoder.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def _two_data_modalities(y_seen: list[int]):
    """Data modalities x and w (each missing on some rows) and a physics y observed on
    ``y_seen``; ``log_q_of(present)`` is the closed-form log q(c | PoE) in numpy."""
    torch.manual_seed(0)
    specs = {
        "x": GaussianModality(shape=(3,), scale=0.7, hidden=(8,)),
        "w": GaussianModality(shape=(2,), scale=0.7, hidden=(8,)),
        "y": PhysicsModality(shape=(5,), expert=Affine(), hidden=(8,)),
    }
    net = PIMAModule(specs, 3, 2).double()
    with torch.no_grad():
        net.mixture.loc.copy_(2 * torch.randn(3, 2))
        net.modalities["y"].expert.unconstrained_noise.add_(3.0)  # vague curves
    g = torch.Generator().manual_seed(3)
    n = len(y_seen)
    values = {
        "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "w": torch.randn(n, 2, generator=g, dtype=torch.float64),
        "y": torch.randn(n, 5, generator=g, dtype=torch.float64),
    }
    observed = {
        "x": torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)[:n],
        "w": torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)[:n],
        "y": torch.tensor(y_seen, dtype=torch.bool),
    }
    with torch.no_grad():
        mu, sigma = net.mixture.loc.numpy(), net.mixture.scale.numpy()
        log_pi = net.mixture.log_weights.numpy()
        enc = {k: [t.numpy() for t in net.modalities[k].encoder(values[k])] for k in ("x", "w")}

    def log_q_of(present):  # PoE of the N(0, I) expert and the experts in ``present``
        precision = 1.0 + sum(np.exp(-enc[k][1]) * present[k][:, None] for k in present)
        var = 1.0 / precision
        loc = sum(enc[k][0] * np.exp(-enc[k][1]) * present[k][:, None] for k in present) * var
        expected = -0.5 * (
            np.log(2 * math.pi * sigma**2)[None]
            + (var[:, None] + (loc[:, None] - mu[None]) ** 2) / sigma[None] ** 2
        ).sum(-1)
        return np.log(_softmax(log_pi + expected))

    seen = {k: observed[k].numpy().astype(float) for k in ("x", "w")}
    return net, Batch(values, observed, torch.arange(n), n), log_q_of, seen


def test_with_two_data_modalities_the_target_is_their_joint_posterior():
    """Rows without y: each encoder's cross-entropy is to the sharpened posterior of the PoE
    of every observed data modality (co-training), computed here from the joint encoding."""
    net, batch, log_q_of, seen = _two_data_modalities([0, 0, 0, 0, 0])
    n = batch.size
    target = _softmax(2.0 * log_q_of(seen))
    ones = np.ones(n)
    expected = -sum(
        ((target * log_q_of({k: ones})).sum(-1) * seen[k]).sum() / n for k in ("x", "w")
    )
    assert float(cross_modal_loss(net, batch).detach()) == pytest.approx(expected, rel=1e-6)
    own = -sum(
        ((_softmax(2.0 * log_q_of({k: ones})) * log_q_of({k: ones})).sum(-1) * seen[k]).sum() / n
        for k in ("x", "w")
    )
    assert abs(own - expected) > 1e-3  # the joint target is not each modality's own


def test_with_two_data_modalities_the_paired_target_uses_their_joint_posterior():
    """Rows with y: the target is Bayes' rule on the curve's likelihood and, at full data
    evidence, the PoE posterior of every observed data modality (not each encoder's own)."""
    net, batch, log_q_of, seen = _two_data_modalities([1, 1, 1, 1, 1])
    n = batch.size
    with torch.no_grad():
        ll = net.modalities["y"].cluster_log_likelihood(batch.values["y"]).numpy()
    ones = np.ones(n)

    def paired_part(log_q_target):
        target = _softmax(log_q_target + ll)
        return -sum(((target * log_q_of({k: ones})).sum(-1) * seen[k]).sum() / n for k in seen)

    expected = paired_part(log_q_of(seen))
    assert float(cross_modal_loss(net, batch, 1.0, 0.0, 1.0)) == pytest.approx(expected, rel=1e-6)
    own_x = paired_part(log_q_of({"x": ones}))
    assert abs(own_x - expected) > 1e-3 * abs(expected)  # the joint is not x's own


def test_each_data_encoder_runs_once_per_evaluation():
    """The joint self-training target reuses the experts of the per-modality posteriors."""
    specs = {
        "x": GaussianModality(shape=(3,), scale=0.7, hidden=(8,)),
        "w": GaussianModality(shape=(2,), scale=0.7, hidden=(8,)),
        "y": PhysicsModality(shape=(5,), expert=Affine(), hidden=(8,)),
    }
    net = PIMAModule(specs, 3, 2)
    n = 4
    values = {"x": torch.randn(n, 3), "w": torch.randn(n, 2), "y": torch.zeros(n, 5)}
    observed = {k: torch.tensor([1, 1, 0, 1], dtype=torch.bool) for k in ("x", "w")}
    observed["y"] = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    calls = {"x": 0, "w": 0}
    for name in calls:
        net.modalities[name].encoder.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    cross_modal_loss(net, Batch(values, observed, torch.arange(n), n))
    assert calls == {"x": 1, "w": 1}


def test_its_gradient_reaches_the_data_encoders_only():
    net = tiny_module()
    cross_modal_loss(net, tiny_batch(net)).backward()
    moved = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("modalities.x.encoder.") for n in moved)


def _informative_toy(n: int = 300, seed: int = 0):
    """Three clusters: x is a noisy code of the cluster, y an Affine line per cluster."""
    net = tiny_module(n_clusters=3, latent_dim=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    codes = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]], dtype=torch.float64)
    x = codes[labels] + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    expert, grid = net.modalities["y"].expert, net.modalities["y"].grid
    with torch.no_grad():
        curves = expert.expected_curve(expert.theta, grid)[labels]
    y = curves + 0.05 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.bool)
    return net, Batch({"x": x, "y": y}, {"x": ones, "y": ones}, torch.arange(n), n), labels


def test_minimising_it_teaches_the_encoder_the_physics_clusters_and_nothing_else():
    """With the data evidence in the paired target ramped from 0 to 1 over the first half of
    the steps, as the training plan does; from the full evidence at once, this start's
    confidently wrong encoder teaches itself (0.63 of the clusters right after 300 steps)."""
    net, batch, labels = _informative_toy()
    target = cluster_log_posterior(net, batch, ["y"])
    assert bool((target.argmax(1) == labels).all())  # the physics alone knows the clusters
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if "encoder" not in n}
    before = encoder_cluster_log_posterior(net, "x", batch.values["x"]).argmax(1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(300):
        optimizer.zero_grad()
        cross_modal_loss(net, batch, 1.0, 1.0, min(1.0, (step + 1) / 150)).backward()
        optimizer.step()
    after = encoder_cluster_log_posterior(net, "x", batch.values["x"]).argmax(1)
    assert float((before == labels).double().mean()) < 0.7  # the start does not know them
    assert float((after == labels).double().mean()) >= 0.98
    for name, value in frozen.items():
        assert torch.equal(dict(net.named_parameters())[name].detach(), value), name


@pytest.mark.parametrize("weights", [(0.0, 0.0), (2.5, 0.0), (0.0, 1.5), (2.5, 1.5)])
def test_a_step_minimises_the_elbo_plus_the_weighted_parts_and_logs_the_elbo(weights):
    from pima_pyro.data import MultimodalData
    from pima_pyro.inference.training_plan import LoopOptions, PIMATrainingPlan, Schedule

    net = tiny_module()
    batch = tiny_batch(net)
    on_pairs, on_rest = _by_hand(net, batch)
    data = MultimodalData({"x": batch.values["x"].float(), "y": batch.values["y"].float()})
    paired, unpaired = weights
    options = LoopOptions(
        batch_size=6, lr=1e-3, seed=0, cross_modal_weight=paired, self_training_weight=unpaired
    )
    plan = PIMATrainingPlan(net, data, Schedule(1, 0, 0), options)
    plan._objective = lambda b: torch.tensor(1.0, dtype=torch.float64)
    objective, logged = plan.step_objective(batch)
    expected = 1.0 + paired * on_pairs + unpaired * on_rest
    assert float(objective.detach()) == pytest.approx(expected, rel=1e-10)
    assert float(logged) == 1.0


@pytest.mark.parametrize(
    "option, error",
    [
        ({"cross_modal_weight": -0.5}, ValueError),
        ({"cross_modal_weight": float("nan")}, ValueError),
        ({"cross_modal_weight": "1"}, TypeError),
        ({"self_training_weight": -1.0}, ValueError),
        ({"self_training_weight": float("inf")}, ValueError),
        ({"self_training_weight": None}, TypeError),
        ({"self_training_ramp": -0.1}, ValueError),
        ({"self_training_ramp": 1.5}, ValueError),
        ({"self_training_ramp": float("nan")}, ValueError),
        ({"self_training_ramp": "half"}, TypeError),
        ({"joint_moves": -1}, ValueError),
        ({"joint_moves": 1.5}, TypeError),
    ],
)
def test_bad_weights_and_move_counts_are_refused_naming_the_option(option, error):
    from pima_pyro.inference.training import FitOptions

    with pytest.raises(error, match=next(iter(option))):
        FitOptions.from_keywords(option)


def test_the_self_training_weight_reaches_the_loop_and_the_resume_fingerprint():
    """``fit``'s options (the weight and the ramp) arrive in ``LoopOptions`` (built by name in
    ``loop_options``) and a checkpoint written with another value is not resumed."""
    from pima_pyro.inference.training import FitOptions, loop_options

    net = tiny_module()
    a = FitOptions.from_keywords({"self_training_weight": 0.25})
    a.check_types()
    b = FitOptions.from_keywords({})
    b.check_types()
    assert loop_options(a).self_training_weight == 0.25
    assert loop_options(a).cross_modal_weight == 1.0
    assert a.fingerprint(net, 6)["self_training_weight"] == 0.25
    assert a.fingerprint(net, 6) != b.fingerprint(net, 6)
    ramped = FitOptions.from_keywords({"self_training_ramp": 0.0})
    ramped.check_types()
    assert loop_options(ramped).self_training_ramp == 0.0
    assert loop_options(b).self_training_ramp == 0.5
    assert ramped.fingerprint(net, 6) != b.fingerprint(net, 6)


def test_the_self_training_ramp_rises_linearly_over_its_fraction_of_the_epochs():
    from pima_pyro.inference.training_plan import Schedule

    schedule = Schedule(10, 1, 2)
    assert [schedule.ramp_factor(e, 0.5) for e in range(7)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]
    )
    assert [schedule.ramp_factor(e, 0.25) for e in range(4)] == pytest.approx([0.4, 0.8, 1.0, 1.0])
    assert all(schedule.ramp_factor(e, 0.0) == 1.0 for e in range(10))
    assert Schedule(1, 0, 0).ramp_factor(0, 1.0) == 1.0


@pytest.mark.parametrize(
    "ramp, epoch, factor", [(0.5, 0, 0.2), (0.0, 0, 1.0), (1.0, 0, 0.1), (0.5, 3, 0.8)]
)
def test_a_step_weights_the_self_training_part_by_the_ramp(monkeypatch, ramp, epoch, factor):
    """At ``epoch`` of 10 the self-training part counts ``factor`` of its weight and the data
    evidence enters the paired target to the power ``factor``; the paired weight is not
    ramped."""
    from pima_pyro.data import MultimodalData
    from pima_pyro.inference.training_plan import LoopOptions, PIMATrainingPlan, Schedule

    net = _vague_physics_module()
    batch = tiny_batch(net)
    _, on_rest = _by_hand(net, batch)
    data = MultimodalData({"x": batch.values["x"].float(), "y": batch.values["y"].float()})
    options = LoopOptions(
        batch_size=6, lr=1e-3, seed=0, cross_modal_weight=2.0, self_training_weight=1.5,
        self_training_ramp=ramp,
    )  # fmt: skip
    monkeypatch.setattr(PIMATrainingPlan, "current_epoch", property(lambda _: epoch))
    plan = PIMATrainingPlan(net, data, Schedule(10, 0, 0), options)
    assert plan.cross_modal_weights() == (2.0, pytest.approx(1.5 * factor), factor)
    plan._objective = lambda b: torch.tensor(1.0, dtype=torch.float64)
    objective, _ = plan.step_objective(batch)
    on_pairs, _ = _by_hand(net, batch, data_evidence=factor)
    expected = 1.0 + 2.0 * on_pairs + 1.5 * factor * on_rest
    assert float(objective.detach()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_a_non_finite_step_is_described_with_the_term_only_when_it_is_on(weights):
    from pima_pyro.data import MultimodalData
    from pima_pyro.inference.training_plan import LoopOptions, PIMATrainingPlan, Schedule

    net = tiny_module()
    batch = tiny_batch(net)
    data = MultimodalData({"x": batch.values["x"].float(), "y": batch.values["y"].float()})
    options = LoopOptions(
        batch_size=6, lr=1e-3, seed=0, cross_modal_weight=weights[0],
        self_training_weight=weights[1],
    )  # fmt: skip
    plan = PIMATrainingPlan(net, data, Schedule(1, 0, 0), options)
    described = "cross-modal term finite" in plan.describe_step(batch)
    assert described == (weights != (0.0, 0.0))


def test_without_the_paired_part_the_physics_likelihood_is_not_computed(monkeypatch):
    import pima_pyro.inference.cross_modal as cross_modal

    def refuse(*_):
        raise AssertionError("physics likelihood computed with cross_modal_weight=0")

    net = tiny_module()
    batch = tiny_batch(net)
    before_patch = float(cross_modal_loss(net, batch, 0.0, 1.0))
    monkeypatch.setattr(cross_modal, "physics_cluster_log_likelihood", refuse)
    assert float(cross_modal_loss(net, batch, 0.0, 1.0)) == before_patch
    with pytest.raises(AssertionError, match="computed"):
        cross_modal_loss(net, batch, 1.0, 1.0)
