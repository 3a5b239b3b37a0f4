r"""Split-and-merge moves judged by the joint ELBO, after the anchor phase.

The physics EM start (:func:`~pima_pyro.inference.initialization.physics_mixture_em`) can only
use the curves. Where two physics laws are too close for the curves to tell apart, its best
partition can be wrong by a few nats of physics log-likelihood: on ten ``ExponentialDecay``
clusters (rates 0.3..3.0) seed 3 kept a spurious cluster at rate 1.61 between 1.5 and 1.8 and
merged 2.7 with 3.0 (joint accuracy 0.86), while the true partition is 1.5 nats worse for the
curves and 4 nats better for the ELBO once the images are in.

After the anchor phase the encoders place every sample, and these moves (Ueda et al., 2000)
look again with every modality: merge the two clusters whose responsibilities overlap most,
split the cluster whose members' data embeddings spread most (2-means on the embeddings), rerun
the physics EM from those responsibilities, place the latent mixture on the embeddings
(:func:`~pima_pyro.inference.initialization.mixture_from_embeddings`), and keep the state with
the highest ELBO on a fixed sample of rows with fixed latent draws (common random numbers). The
full phase then trains everything from the kept state.

These rounds do not remove clusters. Removal scored by the ELBO plus a BIC penalty was tried
here: at the end of the anchor the ELBO undervalues what the images will separate later (ten
decays: merging rates 2.7 and 3.0 costs 13 nats there, below the 46-nat penalty, although the
trained model tells them apart). ``fit(prune_clusters=True)`` prunes in the start instead, by
the BIC of the curves given the images (:func:`~pima_pyro.inference.gated_em.prune_gated`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from pima_pyro.data import Batch
from pima_pyro.inference.initialization import (
    em_from_responsibilities,
    em_problem,
    merge_and_split,
    mixture_from_embeddings,
    split_merge_candidates,
)
from pima_pyro.inference.posterior import (
    any_observed_rows,
    cluster_log_posterior,
    latent_posterior,
)
from pima_pyro.inference.svi import set_physics_from_em, validation_loss
from pima_pyro.models.module import PIMAModule

#: A move kept by :func:`joint_split_and_merge`: ``("merge_split", (i, j, k))`` merges j into
#: i and splits k.
Move = tuple[str, tuple[int, ...]]

#: Rows the moves look at: the ELBO and the EM of every candidate run on at most this many.
MOVE_ROWS: int = 5000


def can_move(net: PIMAModule) -> bool:
    """Moves need a physics and a data modality, point-estimate globals and K > 2."""
    return (
        bool(net.physics_names)
        and bool(net.data_names)
        and not net.bayesian_globals
        and int(net.mixture.active.sum()) > 2
    )


def move_sample(full: Batch, latent_dim: int, seed: int) -> Batch:
    """At most :data:`MOVE_ROWS` rows of ``full`` (seeded), with fixed standard-normal draws
    of ``z`` so that every candidate's ELBO is scored on the same noise."""
    device = full.indices.device
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randperm(full.size, generator=gen, device=device)[:MOVE_ROWS]
    sample = full.take(rows.sort().values)
    dtype = next(iter(full.values.values())).dtype
    sample.noise = torch.randn(sample.size, latent_dim, generator=gen, device=device, dtype=dtype)
    return sample


def refit_from_responsibilities(net: PIMAModule, sample: Batch, resp: torch.Tensor) -> None:
    """Physics EM from ``resp`` (N, K) on ``sample``'s curves, then the latent mixture from
    the embeddings weighted by EM's responsibilities (in place)."""
    physics = net.physics_names
    problem = em_problem(
        {p: sample.values[p] for p in physics},
        {p: sample.observed[p] for p in physics},
        {p: net.modalities[p].expert for p in physics},
        {p: net.modalities[p].grid for p in physics},
    )
    em = em_from_responsibilities(resp.double(), problem, net.mixture.active.clone())
    place_mixture_on_embeddings(net, sample, em.responsibilities)
    set_physics_from_em(net, em)  # the weights of EM, inactive clusters kept at exactly 0


@torch.no_grad()
def place_mixture_on_embeddings(
    net: PIMAModule, batch: Batch, resp: torch.Tensor | None, seed: int = 0
) -> None:
    """The latent mixture's pi, mu and sigma from the embeddings q(z | every observed modality)
    of ``batch``, weighted by ``resp`` (N, K), or a GMM on them when ``resp`` is ``None``
    (:func:`~pima_pyro.inference.initialization.mixture_from_embeddings`).

    Only samples with a physics modality observed count: physics EM gives the others
    responsibilities equal to the weights, which would pull every component to the centre of all the
    embeddings (half the curves hidden: each component's mean halfway to the centre)."""
    loc, scale = latent_posterior(net, batch, net.modality_names)
    if resp is not None and net.physics_names:
        with_physics = any_observed_rows(batch, net.physics_names, slice(0, batch.size))
        resp = resp.to(loc) * with_physics[:, None].to(loc)
    weights, mu, sd = mixture_from_embeddings(
        loc, 2 * torch.log(scale), None if resp is None else resp.to(loc), net.n_clusters, seed
    )
    net.mixture.set_parameters(weights, mu, sd)


@torch.no_grad()
def elbo_of(net: PIMAModule, sample: Batch) -> float:
    """The data set's ELBO estimated from ``sample`` (its fixed draws): the mean per row times
    the data set's size, every observed modality encoded."""
    return -validation_loss(net, sample) * sample.n_total


def joint_split_and_merge(
    net: PIMAModule,
    full: Batch,
    seed: int,
    rounds: int = 3,
    n_pairs: int = 3,
    n_splits: int = 5,
) -> list[Move]:
    """At most ``rounds`` rounds; returns the moves kept. Each round compares every move with
    the same refit (:func:`refit_from_responsibilities`) of the current partition, so that
    partitions compete on equal terms, and keeps the best move that beats it; without one the
    state is left as it was."""
    if rounds == 0 or not can_move(net):
        return []
    was_training = net.training
    net.eval()
    sample = move_sample(full, net.latent_dim, seed)
    kept: list[Move] = []
    for _ in range(rounds):
        move = _best_move(net, sample, n_pairs, n_splits)
        if move is None:
            break
        kept.append(move)
    net.train(was_training)
    return kept


def _best_move(net: PIMAModule, sample: Batch, n_pairs: int, n_splits: int) -> Move | None:
    """Apply the merge-and-split move
    (:func:`~pima_pyro.inference.initialization.split_merge_candidates`) with the highest ELBO,
    if it beats the refit of the current partition; else restore the state and return
    ``None``."""
    start = copy.deepcopy(net.state_dict())
    resp = cluster_log_posterior(net, sample, net.modality_names, num_samples=0).exp()
    embeddings, _ = latent_posterior(net, sample, net.data_names)
    features = embeddings.detach().double().cpu().numpy()
    refit_from_responsibilities(net, sample, resp)
    best_score, best_state, best_move = elbo_of(net, sample), None, None
    active = net.mixture.active
    for move in split_merge_candidates(resp, active, features, n_pairs, n_splits):
        net.load_state_dict(start)
        refit_from_responsibilities(net, sample, merge_and_split(resp, *move, features))
        score = elbo_of(net, sample)
        if np.isfinite(score) and score > best_score + 1e-6 * abs(best_score):
            best_score, best_state = score, copy.deepcopy(net.state_dict())
            best_move = ("merge_split", move)
    net.load_state_dict(start if best_state is None else best_state)
    return best_move
