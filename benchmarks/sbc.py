"""Simulation-based calibration of the NUTS physics posterior.

For each of ``--sims`` data sets: draw the globals from the model's own priors (the prior sites
of :meth:`PIMAModule.global_prior_sites`), simulate curves (c from pi, y | c from the physics
likelihood of the model), start from EM, run NUTS, relabel, thin, and record the rank of each
true (sorted) parameter among the draws.
Calibrated inference gives uniform ranks: a chi-square test per parameter on 10 bins, and a
figure of the rank histograms. Prints one JSON line.

    python benchmarks/sbc.py [--sims 100] [--out benchmarks/figures]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from scipy import stats

from pima_pyro import LinearThroughOrigin, PhysicsModality
from pima_pyro.data import Batch
from pima_pyro.inference.mcmc import physics_nuts, relabel
from pima_pyro.inference.svi import initialize_from_physics
from pima_pyro.models.module import PIMAModule

K, N, T = 2, 30, 8
BINS = 10


def simulate(net: PIMAModule, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Globals from the model's priors, then c ~ pi and y | c from the physics likelihood."""
    pyro.set_rng_seed(seed)
    truth = {site: prior.sample() for site, prior in net.global_prior_sites()}
    c = torch.multinomial(truth["pi"], N, replacement=True)
    likelihood = net.modalities["y"].likelihood(c, truth["theta_y"], truth["noise_y"])
    return truth, likelihood.sample()


def one_simulation(seed: int, warmup: int, draws: int, thin: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    net = PIMAModule(
        {"y": PhysicsModality(shape=(T,), expert=LinearThroughOrigin(), hidden=(4,))}, K, 1
    ).double()
    net.modalities["y"].grid.copy_(torch.linspace(0.1, 1.0, T))
    truth, curves = simulate(net, seed)
    full = Batch({"y": curves}, {"y": torch.ones(N, dtype=torch.bool)}, torch.arange(N), N)
    initialize_from_physics(net, full, seed=seed, em_starts=3)
    result = physics_nuts(
        net, {"y": curves}, num_samples=draws, warmup_steps=warmup, num_chains=1, seed=seed
    )
    sorted_truth = relabel(net, {k: v[None, None] for k, v in truth.items()}, ("y", 0))
    ranks = {}
    for site in ("pi", "theta_y", "noise_y"):
        samples = result.samples[site][0][::thin].reshape(len(result.samples[site][0][::thin]), -1)
        true = sorted_truth[site].reshape(-1).numpy()
        ranks[site] = (samples < true).sum(0)
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--draws", type=int, default=396)
    parser.add_argument("--thin", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    ranks: dict[str, list[np.ndarray]] = {}
    for sim in range(args.sims):
        for site, r in one_simulation(sim, args.warmup, args.draws, args.thin).items():
            ranks.setdefault(site, []).append(r)
    seconds = time.perf_counter() - start
    max_rank = len(range(0, args.draws, args.thin))
    names, pvalues, histograms = [], [], []
    for site, values in ranks.items():
        values = np.stack(values)  # (sims, entries)
        for j in range(values.shape[1]):
            counts, _ = np.histogram(values[:, j], bins=BINS, range=(0, max_rank + 1))
            names.append(f"{site}[{j}]")
            pvalues.append(float(stats.chisquare(counts).pvalue))
            histograms.append(counts)
    _plot(names, histograms, pvalues, args.sims, Path(args.out) / "sbc_ranks.png")
    print(
        json.dumps(
            {
                "benchmark": "sbc_physics_nuts",
                "sims": args.sims,
                "K": K,
                "N": N,
                "T": T,
                "draws_per_sim": max_rank,
                "seconds": round(seconds, 1),
                "chi2_pvalues": dict(zip(names, np.round(pvalues, 4).tolist(), strict=True)),
                "min_pvalue": round(min(pvalues), 4),
                "figure": str(Path(args.out) / "sbc_ranks.png"),
            }
        )
    )


def _plot(names, histograms, pvalues, sims, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.4), sharey=True)
    for ax, name, counts, p in zip(axes, names, histograms, pvalues, strict=True):
        ax.bar(np.arange(BINS), counts, width=1.0, color="C0", edgecolor="white")
        ax.axhline(sims / BINS, color="k", lw=1)
        ax.set_title(f"{name}\np = {p:.3f}", fontsize=8)
        ax.set_xticks([])
    fig.suptitle(f"SBC rank histograms, {sims} simulations", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
