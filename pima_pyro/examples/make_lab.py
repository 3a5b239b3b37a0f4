"""Writes ``lab.nc``: what a lab's own file looks like (run once; the file ships).

300 samples of four materials: an 8x8 micrograph (scikit-learn digits 0-3, pixels in [0, 1]),
a decay curve ``exp(-r t)`` on 20 points of [0, 2] (rates 0.5, 1, 2, 4; noise 0.03) and a
scalar hardness (means 1, 2, 3, 4; sd 0.2). Missing entries are NaN: 30% of the curves, 20% of
the hardness values and 10% of the images (a sample keeps at least one modality).
"""

from pathlib import Path

import numpy as np
import xarray as xr
from sklearn.datasets import load_digits


def make(seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    digits = load_digits()
    rows = np.flatnonzero(digits.target < 4)[:300]
    labels = digits.target[rows]
    images = (digits.images[rows] / 16.0).astype(np.float32)
    t = np.linspace(0.0, 2.0, 20)
    rates = np.array([0.5, 1.0, 2.0, 4.0])[labels]
    curves = np.exp(-rates[:, None] * t) + rng.normal(0, 0.03, (rows.size, t.size))
    hardness = labels + 1.0 + rng.normal(0, 0.2, rows.size)
    curve_missing = rng.random(rows.size) < 0.3
    hard_missing = rng.random(rows.size) < 0.2
    image_missing = (rng.random(rows.size) < 0.1) & ~curve_missing & ~hard_missing
    curves[curve_missing] = np.nan
    hardness[hard_missing] = np.nan
    images[image_missing] = np.nan
    return xr.Dataset(
        {
            "image": (("sample", "row", "col"), images),
            "curve": (("sample", "curve_t"), curves.astype(np.float32)),
            "hardness": (("sample",), hardness.astype(np.float32)),
            "label": (("sample",), labels.astype(np.int64)),
        },
        coords={"sample": np.arange(rows.size), "curve_t": t},
        attrs={"description": "pima-pyro example: micrographs, decay curves, hardness"},
    )


if __name__ == "__main__":
    make().to_netcdf(Path(__file__).with_name("lab.nc"), engine="h5netcdf")
