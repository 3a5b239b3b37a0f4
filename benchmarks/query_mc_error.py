"""Monte-Carlo error of ``cluster_posterior`` given the image on the digits demo.

Trains the demo model (digits_affine, seed 0, 200 epochs, demo settings), then evaluates
p(c | image) on the test split with ``--repeats`` different query seeds at ``num_samples`` draws
of z, and reports the largest and mean standard deviation across seeds of each probability
(the Monte-Carlo error of one query). Prints one JSON line.

    python benchmarks/query_mc_error.py [--epochs 200] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.cli import DEMO_DEFAULTS
from pima_pyro.datasets import affine_modalities, digits_affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DEMO_DEFAULTS["digits"]
    train, test = digits_affine(seed=0).train_test_split(0.3, seed=0)
    model = PIMA(affine_modalities(image_scale=cfg["image_scale"]), n_clusters=10, latent_dim=4)
    model.fit(
        train,
        epochs=args.epochs,
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        seed=0,
        progress=False,
    )
    out = {"benchmark": "cluster_posterior_mc_error", "n_test": test.n_samples}
    for num_samples in args.num_samples:
        start = time.perf_counter()
        runs = np.stack(
            [
                model.cluster_posterior(test, given=["image"], num_samples=num_samples, seed=s)
                for s in range(args.repeats)
            ]
        )
        sd = runs.std(0, ddof=1)
        out[f"S={num_samples}"] = {
            "max_sd": round(float(sd.max()), 4),
            "mean_sd": round(float(sd.mean()), 5),
            "p99_sd": round(float(np.quantile(sd, 0.99)), 4),
            "seconds_per_query": round((time.perf_counter() - start) / args.repeats, 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
