"""The seed's applications as numbers: PVD cross-modal table, lattice and tribology claims.

Usage::

    python benchmarks/modality_table.py [--seeds 10] [--quick] [--threads 1]

For every seed: fit PIMA on ``pvd`` (60/20/20 train/test/val split) and report the relative L2
error of predicting X4 (residual stress) from every non-empty subset of {X1, X2, X3} and from all
four, as a ratio to the all-four error; fit on ``lattice`` (70/30) and report image-only
population accuracy and the curve-from-image relative L2 error (and the same error when predicting
with the true population's curve, the oracle); fit on ``tribology`` (70/30) and report
p(c | acoustic) accuracy beside p(c | all). Prints a Markdown table, then, as its LAST line, one
JSON object. ``--quick``: 3 seeds, fewer epochs. torch runs with ``--threads`` intra-op threads
(default 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import (
    lattice,
    lattice_modalities,
    lattice_truth,
    pvd,
    pvd_modalities,
    tribology,
    tribology_modalities,
)
from pima_pyro.metrics import matched_accuracy, relative_l2
from pima_pyro.models.experts import BilinearStressStrain

INPUTS = ["X1", "X2", "X3"]
SUBSETS = [["X1", "X2", "X3", "X4"]] + [
    list(c) for r in (3, 2, 1) for c in itertools.combinations(INPUTS, r)
]


def _three_way_split(data, seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(data.n_samples)
    n_train, n_test = int(0.6 * data.n_samples), int(0.2 * data.n_samples)
    return {
        "train": data.subset(np.sort(perm[:n_train])),
        "test": data.subset(np.sort(perm[n_train : n_train + n_test])),
        "val": data.subset(np.sort(perm[n_train + n_test :])),
    }


def run_pvd(seed: int, epochs: int) -> dict[str, dict[str, float]]:
    splits = _three_way_split(pvd(n_samples=600, seed=seed), seed)
    model = PIMA(pvd_modalities(), n_clusters=3, latent_dim=4)
    model.fit(splits["train"], epochs=epochs, batch_size=64, seed=seed, progress=False)
    errors: dict[str, dict[str, float]] = {}
    for split, part in splits.items():
        truth = part.values["X4"].numpy()
        errors[split] = {
            "+".join(given): relative_l2(
                model.predict(part, given=given, target="X4", seed=seed).mean.numpy(), truth
            )
            for given in SUBSETS
        }
    return errors


def run_lattice(seed: int, epochs: int) -> dict[str, float]:
    train, test = lattice(seed=seed).train_test_split(0.3, seed=seed)
    model = PIMA(lattice_modalities(), n_clusters=2, latent_dim=4)
    model.fit(train, epochs=epochs, batch_size=32, seed=seed, progress=False)
    accuracy, _ = matched_accuracy(
        test.labels.numpy(), model.predict_clusters(test, given=["image"])
    )
    predicted = model.predict(test, given=["image"], target="curve", seed=seed).mean.numpy()
    truth = test.values["curve"].numpy()
    oracle = BilinearStressStrain().expected_curve(
        torch.tensor(lattice_truth(2)[test.labels.numpy()]), test.grids["curve"].double()
    )
    return {
        "image_only_accuracy": accuracy,
        "curve_from_image_rel_l2": relative_l2(predicted, truth),
        "oracle_rel_l2": relative_l2(oracle.numpy(), truth),
    }


def run_tribology(seed: int, epochs: int) -> dict[str, float]:
    train, test = tribology(seed=seed).train_test_split(0.3, seed=seed)
    model = PIMA(tribology_modalities(), n_clusters=2, latent_dim=4)
    model.fit(train, epochs=epochs, batch_size=64, seed=seed, progress=False)
    labels = test.labels.numpy()
    return {
        "acoustic_only_accuracy": matched_accuracy(
            labels, model.predict_clusters(test, given=["acoustic"])
        )[0],
        "all_accuracy": matched_accuracy(labels, model.predict_clusters(test))[0],
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 seeds, fewer epochs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = 3 if args.quick else args.seeds
    epochs = (
        {"pvd": 60, "lattice": 50, "tribology": 50}
        if args.quick
        else {"pvd": 150, "lattice": 100, "tribology": 100}
    )
    start = time.perf_counter()
    pvd_runs, lattice_runs, tribology_runs = [], [], []
    for seed in range(seeds):
        pvd_runs.append(run_pvd(seed, epochs["pvd"]))
        lattice_runs.append(run_lattice(seed, epochs["lattice"]))
        tribology_runs.append(run_tribology(seed, epochs["tribology"]))

    # ratio to the all-four error, averaged over seeds (the seed's Table 1 convention)
    full = "+".join(SUBSETS[0])
    ratios = {
        split: {
            key: float(np.mean([run[split][key] / run[split][full] for run in pvd_runs]))
            for key in pvd_runs[0][split]
        }
        for split in ("train", "test", "val")
    }
    absolute = {split: float(np.mean([run[split][full] for run in pvd_runs])) for split in ratios}
    print(f"## PVD: relative L2 error of X4, ratio to all four ({seeds} seeds)\n")
    print("| Input modalities | Train | Test | Val. |")
    print("|---|---|---|---|")
    for given in SUBSETS:
        key = "+".join(given)
        print(
            f"| ({', '.join(given)}) | {ratios['train'][key]:.3f} | {ratios['test'][key]:.3f} "
            f"| {ratios['val'][key]:.3f} |"
        )
    print(
        f"\nAll four modalities: {100 * absolute['train']:.2f}% / {100 * absolute['test']:.2f}% / "
        f"{100 * absolute['val']:.2f}% relative L2 (train/test/val).\n"
    )

    def mean_std(runs, key):
        values = np.array([r[key] for r in runs])
        return float(values.mean()), float(values.std())

    print("## Lattice and tribology (test sets)\n")
    print("| quantity | mean | std |")
    print("|---|---|---|")
    summary = {}
    for name, runs, key in (
        ("lattice image-only accuracy", lattice_runs, "image_only_accuracy"),
        ("lattice curve-from-image rel L2", lattice_runs, "curve_from_image_rel_l2"),
        ("lattice oracle (true population curve) rel L2", lattice_runs, "oracle_rel_l2"),
        ("tribology p(c | acoustic) accuracy", tribology_runs, "acoustic_only_accuracy"),
        ("tribology p(c | all) accuracy", tribology_runs, "all_accuracy"),
    ):
        mean, std = mean_std(runs, key)
        summary[key + ("_lattice" if runs is lattice_runs else "")] = mean
        print(f"| {name} | {mean:.4f} | {std:.4f} |")
    result = {
        "pvd_ratio": {k: round(v, 4) for k, v in ratios["test"].items()},
        "pvd_ratio_train": {k: round(v, 4) for k, v in ratios["train"].items()},
        "pvd_ratio_val": {k: round(v, 4) for k, v in ratios["val"].items()},
        "pvd_all_rel_l2": {k: round(v, 4) for k, v in absolute.items()},
        "lattice_image_only_accuracy": round(mean_std(lattice_runs, "image_only_accuracy")[0], 4),
        "lattice_curve_from_image_rel_l2": round(
            mean_std(lattice_runs, "curve_from_image_rel_l2")[0], 4
        ),
        "lattice_oracle_rel_l2": round(mean_std(lattice_runs, "oracle_rel_l2")[0], 4),
        "tribology_acoustic_only_accuracy": round(
            mean_std(tribology_runs, "acoustic_only_accuracy")[0], 4
        ),
        "tribology_all_accuracy": round(mean_std(tribology_runs, "all_accuracy")[0], 4),
        "seeds": seeds,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
