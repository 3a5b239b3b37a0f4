"""The measurement loop of a self-driving lab, simulated: measure, refit, choose again.

:func:`measurement_loop` starts from a data set whose expensive modality ``measure`` is known
for some samples (the mask), and each round measures ``batch`` more samples chosen by a
strategy (``"eig"``, ``"entropy"`` or ``"random"``; :mod:`pima_pyro.inference.design`), then
refits the model warm-started from the previous round (same networks; the physics EM start
runs again on the curves known so far and the latent mixture's components are matched to its
clusters, :func:`pima_pyro.inference.training.start_from_physics`). In a simulation
"measuring" unmasks the value the data set already holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pima_pyro.data import MultimodalData
from pima_pyro.inference.design import check_about, select_batch
from pima_pyro.pima import PIMA

STRATEGIES = ("eig", "entropy", "random")


def with_known(
    data: MultimodalData, measure: str, known: np.ndarray, values: np.ndarray | None = None
) -> MultimodalData:
    """``data`` with ``measure`` observed exactly where ``known`` (and where it was before);
    with ``values`` (N, ...) the measurements taken so far replace the held ones and ``known``
    alone is the mask."""
    masks = {n: m.numpy().copy() for n, m in data.masks.items()}
    arrays = {n: v.numpy() for n, v in data.values.items()}
    if values is None:
        masks[measure] = masks[measure] & known
    else:
        masks[measure], arrays[measure] = known.copy(), values
    return MultimodalData(
        arrays,
        masks=masks,
        grids={n: g.numpy() for n, g in data.grids.items()},
        labels=None if data.labels is None else data.labels.numpy(),
    )


def measured_values(
    measure_fn: Callable[[np.ndarray], Any], picked: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """``measure_fn(picked)`` checked: finite values of shape ``(len(picked), *shape)``."""
    values = np.asarray(measure_fn(picked), dtype=np.float64)
    if values.shape != (len(picked), *shape) or not np.isfinite(values).all():
        raise ValueError(
            f"measure_fn must return finite values of shape {(len(picked), *shape)} for the "
            f"{len(picked)} samples asked for, got shape {values.shape}"
        )
    return values


def check_strategy(model: PIMA, strategy: str, about: str) -> None:
    """Refuse, before any fit, a strategy or an ``about`` the loop cannot honour."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_about(about)
    if about == "physics" and strategy != "eig":
        raise ValueError(
            f"about='physics' applies to strategy='eig' only, got strategy={strategy!r}"
        )
    if about == "physics" and not model.bayesian_globals:
        raise ValueError("about='physics' needs a model with bayesian_globals=True")


def choose(
    model: PIMA,
    data: MultimodalData,
    measure: str,
    strategy: str,
    size: int,
    rng: np.random.Generator,
    about: str = "cluster",
) -> np.ndarray:
    """``size`` samples without ``measure`` to measure next, by ``strategy`` (``"eig"`` about
    ``about``: ``"cluster"``, or ``"physics"`` under Bayesian globals)."""
    check_strategy(model, strategy, about)
    candidates = np.flatnonzero(~data.masks[measure].numpy())
    size = min(size, candidates.size)
    if strategy == "random":
        return rng.choice(candidates, size, replace=False)
    others = [n for n in model.specs if n != measure and n in data.values]
    probs = model.cluster_posterior(data, given=others)[candidates]
    if strategy == "eig":
        scores = model.expected_information_gain(data, measure, given=others, about=about)
        scores = scores[candidates]
    else:  # "entropy" (check_strategy refused the rest)
        scores = model.cluster_entropy(data, given=others)[candidates]
    return candidates[select_batch(np.clip(scores, 0, None), probs, size)]


def measurement_loop(
    model: PIMA,
    data: MultimodalData,
    measure: str,
    known: np.ndarray,
    strategy: str,
    batch: int,
    rounds: int,
    evaluate: Callable[[PIMA], dict[str, Any]],
    fit_options: dict[str, Any] | None = None,
    seed: int = 0,
    about: str = "cluster",
    measure_fn: Callable[[np.ndarray], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``rounds`` rounds (``about``: what ``"eig"`` counts information about, as in
    :meth:`~pima_pyro.PIMA.expected_information_gain`); returns one record per fit: the
    fraction of ``measure`` known, ``evaluate(model)`` and the seconds of that round (fit +
    choice). ``measure_fn(indices)`` takes the measurements (the lab's instrument; values of
    shape ``(len(indices), ...)``); without it the loop unmasks the values ``data`` holds.
    Each refit prunes clusters by the curves known so far unless ``fit_options`` holds
    ``prune_clusters=False`` (pass it when K is known)."""
    check_strategy(model, strategy, about)
    rng = np.random.default_rng(seed)
    known = np.asarray(known, dtype=bool).copy()
    values = None if measure_fn is None else data.values[measure].numpy().astype(np.float64)
    history = []
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        current = with_known(data, measure, known, values)
        model.fit(current, **{"progress": False, "logger": False, **(fit_options or {})})
        record = {"round": round_, "fraction": float(known.mean()), **evaluate(model)}
        if round_ < rounds:
            picked = choose(model, current, measure, strategy, batch, rng, about)
            if values is not None:
                values[picked] = measured_values(measure_fn, picked, values.shape[1:])
            known[picked] = True
        record["seconds"] = time.perf_counter() - start
        history.append(record)
    return history
