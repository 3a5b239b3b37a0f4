"""Run under Python >= 3.12 with ArviZ 1.x (no torch): open an export of pima-pyro and run
``summary``, ``loo``, ``compare`` and one plot. Usage: python arviz1_check.py EXPORT.nc"""

import sys
import warnings

import arviz as az
import matplotlib

matplotlib.use("Agg")
import xarray as xr  # noqa: E402

warnings.simplefilter("ignore")
tree = xr.open_datatree(sys.argv[1], engine="h5netcdf")
major = int(az.__version__.split(".")[0])
assert major >= 1, az.__version__
summary = az.summary(tree)
loo = az.loo(tree)  # no var_name: the export holds one joint log-likelihood
comparison = az.compare({"a": tree, "b": tree})
az.plot_dist(tree, var_names=["pi"])
print(f"ArviZ {az.__version__}: summary {summary.shape[0]} rows, elpd_loo "
      f"{float(loo.elpd):.1f}, compare {comparison.shape[0]} models, plot_dist ok")
