"""Choosing the next measurement on the digits set: EIG vs uncertainty sampling vs random.

Usage::

    python benchmarks/active_learning.py [--quick] [--seeds 5] [--epochs 30]

Every image is known; the curve is known for 5% of the training samples at the start, and each
round measures 5% more by each strategy (``pima_pyro.design.measurement_loop``; batches chosen
by the greedy duplicate-discounting rule), up to 50%. After every refit: image-only accuracy
on held-out test images and the largest error of the recovered slopes. Prints a table and, as
its LAST line, JSON with the mean curves per strategy, the wall time per round and
``eig_fraction_to_match_random_at_50pct``. ``--quick``: 2 seeds.
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
from pima_pyro.design import STRATEGIES, measurement_loop
from pima_pyro.metrics import matched_accuracy


def evaluator(test):
    def evaluate(model: PIMA) -> dict[str, float]:
        accuracy, _ = matched_accuracy(
            test.labels.numpy(), model.predict_clusters(test, given=["image"])
        )
        slopes = np.sort(model.physics_parameters()["curve"]["theta"][:, 0])
        return {"image_only": accuracy, "slope_error": float(np.abs(slopes - np.arange(10)).max())}

    return evaluate


def run(seed: int, strategy: str, epochs: int) -> list[dict]:
    data = digits_affine(seed=seed)
    train, test = data.train_test_split(0.3, seed=seed)
    rng = np.random.default_rng(seed)
    n = train.n_samples
    known = np.zeros(n, dtype=bool)
    known[rng.choice(n, int(0.05 * n), replace=False)] = True
    torch.manual_seed(seed)
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    options = {"epochs": epochs, "seed": seed, "em_starts": 2, "num_threads": 1}
    return measurement_loop(
        model, train, "curve", known, strategy, batch=int(0.05 * n), rounds=9,
        evaluate=evaluator(test), fit_options=options, seed=seed,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 2 if args.quick else args.seeds
    start = time.perf_counter()
    runs = {s: [run(seed, s, args.epochs) for seed in range(seeds)] for s in STRATEGIES}
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
        "seeds": seeds,
        "random_image_only_at_50pct": target,
        "eig_fraction_to_match_random_at_50pct": min(reached) if reached else None,
        "curves": curves,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
