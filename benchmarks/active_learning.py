"""Choosing the next measurement: EIG vs uncertainty sampling vs random.

Usage::

    python benchmarks/active_learning.py [--quick] [--seeds 5] [--epochs 30]
                                         [--dataset digits|tribology]
                                         [--self-training-ramp 0.5]

``digits``: every image is known; the curve is known for 5% of the training samples at the
start, and each round measures 5% more by each strategy (``pima_pyro.design.measurement_loop``;
batches chosen by the greedy duplicate-discounting rule), up to 50%. After every refit:
image-only accuracy on held-out test images and the largest error of the recovered slopes.
``tribology``: friction and acoustic emission are known for every sample, the depth curve (the
physics modality, the expensive test) for 5% at the start; the accuracy is acoustic-only (the
seed's question) and the physics error the largest error of the depth coefficients. Prints a
table and, as its LAST line, JSON with the mean curves per strategy, the wall time per round
and ``eig_fraction_to_match_random_at_50pct``. ``--quick``: 2 seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.datasets.tribology import DEPTH_THETA, tribology, tribology_modalities
from pima_pyro.design import STRATEGIES, measurement_loop
from pima_pyro.metrics import matched_accuracy


def digits_setup(seed: int) -> dict:
    train, test = digits_affine(seed=seed).train_test_split(0.3, seed=seed)
    return {
        "train": train, "test": test, "specs": affine_modalities(), "measure": "curve",
        "given": ["image"], "truth": np.arange(10.0)[:, None], "columns": [0],
        "n_clusters": 10, "latent_dim": 4,
    }  # fmt: skip


def tribology_setup(seed: int) -> dict:
    train, test = tribology(seed=seed).train_test_split(0.3, seed=seed)
    return {
        "train": train, "test": test, "specs": tribology_modalities(), "measure": "depth",
        "given": ["acoustic"], "truth": DEPTH_THETA[:, 1:], "columns": [1, 2],
        "n_clusters": 2, "latent_dim": 2,
    }  # fmt: skip


SETUPS = {"digits": digits_setup, "tribology": tribology_setup}


def evaluator(setup: dict):
    test, measure, truth, columns = (
        setup["test"],
        setup["measure"],
        setup["truth"],
        setup["columns"],
    )

    def evaluate(model: PIMA) -> dict[str, float]:
        predicted = model.predict_clusters(test, given=setup["given"])
        accuracy, _ = matched_accuracy(test.labels.numpy(), predicted)
        _, mapping = matched_accuracy(test.labels.numpy(), model.predict_clusters(test))
        theta = model.physics_parameters()[measure]["theta"][:, columns]
        error = max(float(np.abs(theta[c] - truth[d]).max()) for c, d in mapping.items())
        return {"image_only": accuracy, "slope_error": error}

    return evaluate


def run(
    seed: int,
    strategy: str,
    epochs: int,
    dataset: str = "digits",
    em_starts: int = 2,
    self_training_ramp: float = 0.5,
) -> list[dict]:
    setup = SETUPS[dataset](seed)
    train = setup["train"]
    rng = np.random.default_rng(seed)
    n = train.n_samples
    known = np.zeros(n, dtype=bool)
    known[rng.choice(n, int(0.05 * n), replace=False)] = True
    torch.manual_seed(seed)
    model = PIMA(setup["specs"], n_clusters=setup["n_clusters"], latent_dim=setup["latent_dim"])
    options = {  # K is known here: each refit keeps every cluster
        "epochs": epochs, "seed": seed, "em_starts": em_starts, "num_threads": 1,
        "prune_clusters": False, "self_training_ramp": self_training_ramp,
    }  # fmt: skip
    return measurement_loop(
        model, train, setup["measure"], known, strategy, batch=int(0.05 * n), rounds=9,
        evaluate=evaluator(setup), fit_options=options, seed=seed,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dataset", choices=list(SETUPS), default="digits")
    parser.add_argument("--em-starts", type=int, default=2, help="EM starts of each refit")
    parser.add_argument(
        "--self-training-ramp", type=float, default=0.5, help="fit(self_training_ramp=...)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 2 if args.quick else args.seeds
    start = time.perf_counter()
    runs = {
        s: [
            run(seed, s, args.epochs, args.dataset, args.em_starts, args.self_training_ramp)
            for seed in range(seeds)
        ]
        for s in STRATEGIES
    }
    curves = {}
    for strategy, histories in runs.items():
        fractions = [r["fraction"] for r in histories[0]]
        curves[strategy] = {
            "fraction": [round(f, 3) for f in fractions],
            "image_only": [round(statistics.mean(h[i]["image_only"] for h in histories), 4)
                           for i in range(len(fractions))],
            "image_only_sd": [round(statistics.pstdev(h[i]["image_only"] for h in histories), 4)
                              for i in range(len(fractions))],
            "slope_error": [round(statistics.mean(h[i]["slope_error"] for h in histories), 4)
                            for i in range(len(fractions))],
            "seconds_per_round": round(
                statistics.mean(r["seconds"] for h in histories for r in h), 2
            ),
        }  # fmt: skip
    target = curves["random"]["image_only"][-1]
    eig = curves["eig"]
    reached = [f for f, a in zip(eig["fraction"], eig["image_only"], strict=True) if a >= target]
    print("| fraction | " + " | ".join(STRATEGIES) + " |")
    print("|---" * (len(STRATEGIES) + 1) + "|")
    for i, f in enumerate(curves["eig"]["fraction"]):
        print(
            f"| {f:.2f} | "
            + " | ".join(f"{curves[s]['image_only'][i]:.3f}" for s in STRATEGIES)
            + " |"
        )
    result = {
        "dataset": args.dataset,
        "seeds": seeds,
        "random_image_only_at_50pct": target,
        "eig_fraction_to_match_random_at_50pct": min(reached) if reached else None,
        "curves": curves,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
