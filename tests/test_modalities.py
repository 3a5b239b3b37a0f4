"""Likelihood families and network kinds of data modalities."""

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from pima_pyro import PIMA, BernoulliModality, GaussianModality, MultimodalData
from pima_pyro.data import Batch
from pima_pyro.datasets import digits_affine
from pima_pyro.models.generative import MAX_PLATE_NESTING, model
from pima_pyro.models.guide import guide
from pima_pyro.models.module import PIMAModule
from pima_pyro.models.networks import ConvDecoder, ConvEncoder


@pytest.mark.parametrize("continuous", [False, True])
def test_bernoulli_elbo_matches_hand_computation(continuous):
    torch.manual_seed(0)
    net = PIMAModule(
        {"b": BernoulliModality(shape=(4,), continuous=continuous, hidden=(8,))}, 2, 2
    ).double()
    x = torch.rand(5, 4, dtype=torch.float64)
    if not continuous:
        x = (x > 0.5).double()
    batch = Batch({"b": x}, {"b": torch.ones(5, dtype=torch.bool)}, torch.arange(5), 5)
    trace = poutine.trace(guide).get_trace(net, batch)
    loss = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).differentiable_loss(
        model, poutine.replay(guide, trace=trace), net, batch
    )
    z, q = trace.nodes["z"]["value"], trace.nodes["z"]["fn"]
    with torch.no_grad():
        logits = net.modalities["b"].decoder(z)
        if continuous:
            ll = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)
        else:
            ll = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
        prior = torch.logsumexp(net.mixture.component_log_prob(z), -1)
        expected = (ll + prior - q.log_prob(z)).sum()
    assert -loss.item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (7, 9)])
def test_conv_networks_round_trip_shapes(shape):
    enc, dec = ConvEncoder(shape, 3), ConvDecoder(shape, 3)
    x = torch.rand(5, *shape)
    loc, log_var = enc(x)
    assert loc.shape == (5, 3) and log_var.shape == (5, 3)
    assert dec(loc).shape == (5, *shape)
    assert dec(torch.zeros(2, 5, 3)).shape == (2, 5, *shape)  # extra sample dims pass through


def test_cnn_and_bernoulli_modalities_train_end_to_end():
    data = digits_affine(seed=0).subset(np.arange(200))
    model = PIMA(
        {
            "image": BernoulliModality(network="cnn", continuous=True),
            "curve": GaussianModality(scale=None, hidden=(16,)),  # learned scale, no physics
        },
        n_clusters=3,
        latent_dim=2,
    )
    history = model.fit(data, epochs=3, batch_size=50, progress=False)
    assert len(history.loss) == 3 and np.all(np.isfinite(history.loss))
    assert history.phase[0] == "warmup"  # without physics the GMM-on-embeddings start is used
    post = model.cluster_posterior(data, given=["image"])
    assert post.shape == (200, 3) and np.allclose(post.sum(1), 1, atol=1e-5)
    pred = model.predict(data, given=["curve"], target="image", num_samples=10)
    assert pred.mean.shape == (200, 8, 8) and pred.samples is None
    assert float(pred.mean.min()) >= 0 and float(pred.mean.max()) <= 1


def test_bernoulli_rejects_values_outside_unit_interval():
    data = MultimodalData({"b": np.array([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])})
    with pytest.raises(
        ValueError, match=r"modality 'b': a BernoulliModality needs values in \[0, 1\]"
    ):
        PIMA({"b": BernoulliModality()}, n_clusters=2).fit(data, epochs=1, progress=False)
    half = MultimodalData({"b": np.array([[0.0, 0.5], [1.0, 0.0], [1.0, 1.0]])})
    with pytest.raises(ValueError, match="needs 0/1 values"):
        PIMA({"b": BernoulliModality(continuous=False)}, n_clusters=2).fit(
            half, epochs=1, progress=False
        )
