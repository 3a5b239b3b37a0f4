"""NUTS on a non-linear expert at digits size: wall time, tree depth and step size.

``ExponentialDecay`` curves, 1,260 samples x 25 points, K = 10 clusters with rates spread over
0.3 to 3.0; 2 chains x (200 warm-up + 200 draws), started from a fit with ``--em-starts`` EM
starts (5, the fit's default, can merge two rates into one cluster and duplicate another; NUTS
then explores that misfit's ridge with long trajectories). Prints one JSON line.

    python benchmarks/nuts_speed.py [--chains 2] [--warmup 200] [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from pyro.ops.stats import split_gelman_rubin

from pima_pyro import PIMA, ExponentialDecay, MultimodalData, PhysicsModality


def decay_data(n: int = 1260, k: int = 10, points: int = 25, seed: int = 0) -> MultimodalData:
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.3, 3.0, k)
    labels = rng.integers(0, k, n)
    t = np.linspace(0.0, 2.0, points)
    amplitude = 1.0 + 0.1 * np.arange(k)
    curves = amplitude[labels, None] * np.exp(-rates[labels, None] * t) + 0.2
    curves = curves + 0.05 * rng.standard_normal(curves.shape)
    return MultimodalData({"curve": curves}, grids={"curve": t}, labels=labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--em-starts", type=int, default=20, help="EM starts of the fit NUTS starts from"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = decay_data()
    model = PIMA(
        {"curve": PhysicsModality(expert=ExponentialDecay(), hidden=(32,))},
        n_clusters=10,
        latent_dim=2,
    )
    # NUTS needs every cluster active
    model.fit(
        data, epochs=2, seed=0, progress=False, em_starts=args.em_starts, prune_clusters=False
    )
    fitted_rates = torch.nn.functional.softplus(
        torch.as_tensor(model.physics_parameters()["curve"]["theta"][:, 1])
    )
    start = time.perf_counter()
    result = model.sample_physics_posterior(
        data,
        num_samples=args.samples,
        warmup_steps=args.warmup,
        num_chains=args.chains,
        order_by=("curve", 1),  # relabel by the rate: slow decays leave the amplitude vague
    )
    seconds = time.perf_counter() - start
    stats = result.sample_stats
    rates = torch.nn.functional.softplus(torch.as_tensor(result.samples["theta_curve"][..., 1]))
    print(
        json.dumps(
            {
                "benchmark": "nuts_exponential_decay",
                "n": data.n_samples,
                "chains": args.chains,
                "warmup": args.warmup,
                "samples": args.samples,
                "seconds": round(seconds, 1),
                "mean_tree_depth": float(np.nanmean(stats["tree_depth"])),
                "max_tree_depth": float(np.nanmax(stats["tree_depth"])),
                "mean_leapfrog_steps": float(np.nanmean(stats["n_steps"])),
                "step_size": [float(np.nanmean(s)) for s in stats["step_size"]],
                "divergences": int(stats["diverging"].sum()),
                "em_starts": args.em_starts,
                "fitted_rates": np.round(np.sort(fitted_rates.numpy()), 2).tolist(),
                "posterior_mean_rates": np.round(rates.mean((0, 1)).numpy(), 3).tolist(),
                "max_r_hat_rates": round(
                    float(
                        max(
                            split_gelman_rubin(rates[..., c].unsqueeze(-1)).item()
                            for c in range(rates.shape[-1])
                        )
                    ),
                    3,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
