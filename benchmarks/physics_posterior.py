"""Posterior of the physics parameters on digits_affine: NUTS diagnostics, interval coverage
over simulated data sets, and PSIS-LOO over K.

Usage::

    python benchmarks/physics_posterior.py mcmc      # 4 chains x (500 warm-up + 500) on seed 0
    python benchmarks/physics_posterior.py coverage  # 20 simulated data sets, 1 chain each
    python benchmarks/physics_posterior.py loo       # K = 8..12, Bayesian globals, LOO on total

Each part prints a table and, as its LAST line, one JSON object. torch uses 1 thread.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import arviz as az
import numpy as np
import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, digits_affine
from pima_pyro.inference.export import mcmc_to_datatree
from pima_pyro.inference.svi import initialize_from_physics

TRUE_SLOPES = np.arange(10.0)


def _mcmc_on(seed: int, num_chains: int, warmup: int, draws: int):
    """NUTS on the physics model of a PIMA over digits_affine, started from the EM estimates."""
    data = digits_affine(seed=seed)
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)
    net = model.build(data)
    initialize_from_physics(net, data.to_batch(dtype=torch.float32), seed=seed)
    result = model.sample_physics_posterior(
        data, num_samples=draws, warmup_steps=warmup, num_chains=num_chains, seed=seed
    )
    return result, data


def part_mcmc(args) -> dict:
    start = time.perf_counter()
    result, data = _mcmc_on(0, 4, args.warmup, args.draws)
    tree = mcmc_to_datatree(result)
    idata = az.InferenceData.from_datatree(tree)
    summary = az.summary(idata, var_names=["curve_theta"], hdi_prob=0.9)
    print(summary.to_string())
    slopes = result.samples["theta_curve"][..., 0].reshape(-1, 10)
    lo, hi = np.quantile(slopes, [0.05, 0.95], axis=0)
    inside = (lo <= TRUE_SLOPES) & (TRUE_SLOPES <= hi)
    return {
        "r_hat_max": float(summary["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "ess_tail_min": float(summary["ess_tail"].min()),
        "divergences": int(result.sample_stats["diverging"].sum()),
        "mean_tree_depth": float(np.nanmean(result.sample_stats["tree_depth"])),
        "mean_step_size": float(np.nanmean(result.sample_stats["step_size"])),
        "slopes_in_90pct_interval": int(inside.sum()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def part_coverage(args) -> dict:
    start = time.perf_counter()
    hits, total = 0, 0
    for seed in range(args.datasets):
        result, _ = _mcmc_on(100 + seed, 1, args.warmup, args.draws)
        slopes = result.samples["theta_curve"][..., 0].reshape(-1, 10)
        lo, hi = np.quantile(slopes, [0.05, 0.95], axis=0)
        inside = (lo <= TRUE_SLOPES) & (TRUE_SLOPES <= hi)
        hits += int(inside.sum())
        total += 10
        print(f"data set {seed}: {int(inside.sum())}/10 true slopes inside the 90% interval")
    coverage = hits / total
    return {
        "coverage_90": coverage,
        "intervals": total,
        "binomial_se": float(np.sqrt(0.9 * 0.1 / total)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def part_loo(args) -> dict:
    start = time.perf_counter()
    data = digits_affine(seed=0)
    compare_in = {}
    pareto = {}
    pointwise = {}
    for k in (8, 9, 10, 11, 12):
        model = PIMA(affine_modalities(), n_clusters=k, latent_dim=4, bayesian_globals=True)
        model.fit(data, epochs=args.epochs, seed=0, progress=False, prune_clusters=False)
        idata = model.to_arviz(data, num_samples=400, posterior_predictive=False)
        compare_in[f"K={k}"] = idata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = az.loo(idata, var_name="total", pointwise=True)
        pareto[f"K={k}"] = round(float((loo.pareto_k.values > 0.7).mean()), 4)
        pointwise[f"K={k}"] = np.asarray(loo.loo_i.values)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = az.compare(compare_in, var_name="total")
    print(table)
    messages = sorted({str(w.message).splitlines()[0] for w in caught})
    return {
        "var_name": "total",
        "best": table.index[0],
        "elpd_loo": {k: round(float(v), 1) for k, v in table["elpd_loo"].items()},
        "elpd_diff_vs_best": {k: round(float(v), 1) for k, v in table["elpd_diff"].items()},
        "dse": {k: round(float(v), 1) for k, v in table["dse"].items()},
        "k10_minus_k8": round(
            float(table.loc["K=10", "elpd_loo"] - table.loc["K=8", "elpd_loo"]), 1
        ),
        "k10_minus_k8_pairwise_se": round(
            float(np.sqrt(len(pointwise["K=10"]) * np.var(pointwise["K=10"] - pointwise["K=8"]))),
            1,
        ),
        "pareto_k_above_0.7_fraction": pareto,
        "warnings": messages,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["mcmc", "coverage", "loo"])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.warmup is None:
        args.warmup = 500 if args.part == "mcmc" else 200
    if args.draws is None:
        args.draws = 500 if args.part == "mcmc" else 200
    result = {"mcmc": part_mcmc, "coverage": part_coverage, "loo": part_loo}[args.part](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
