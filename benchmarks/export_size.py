"""Size and summary time of the default ArviZ export of the digits demo.

Usage::

    python benchmarks/export_size.py [--epochs 200]

Fits the digits demo (its training split, as ``pima-pyro demo``), exports with the defaults of
``PIMA.to_datatree`` (500 draws of the globals, 50 of the posterior predictive, the joint
log-likelihood, no per-sample latents), writes the NetCDF, and times ``az.summary`` with its
defaults. Prints a JSON line last: ``netcdf_mb``, ``summary_seconds``, ``summary_rows``, and
the same for the export with ``latents=True`` and every draw in the PPC (the old default).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import arviz as az
import torch

from pima_pyro import PIMA
from pima_pyro.cli import DEMO_DEFAULTS
from pima_pyro.datasets import affine_modalities, digits_affine


def measure(tree, folder: Path, name: str) -> dict[str, float]:
    path = folder / f"{name}.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    idata = az.from_netcdf(str(path))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata)
    return {
        "netcdf_mb": round(path.stat().st_size / 2**20, 2),
        "summary_seconds": round(time.perf_counter() - start, 2),
        "summary_rows": len(summary),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DEMO_DEFAULTS["digits"]
    train, _ = digits_affine(seed=0).train_test_split(0.3, seed=0)
    model = PIMA(affine_modalities(image_scale=cfg["image_scale"]), n_clusters=10, latent_dim=4)
    model.fit(train, epochs=args.epochs, batch_size=128, lr=5e-3, progress=False, logger=False)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = measure(model.to_datatree(train), Path(tmp), "default")
        full = model.to_datatree(train, ppc_samples=500, latents=True, log_likelihood_terms=True)
        everything = measure(full, Path(tmp), "everything")
    print(json.dumps({"n_samples": train.n_samples, "default": default, "everything": everything}))


if __name__ == "__main__":
    main()
