"""Fit the shipped example briefly (Bayesian globals) and write its ArviZ export to argv[1]."""

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from pima_pyro.cli import main
from pima_pyro.examples import EXAMPLES

torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    for name in ("lab.toml", "lab.nc"):
        shutil.copy(EXAMPLES / name, Path(tmp) / name)
    config = (Path(tmp) / "lab.toml").read_text().replace("epochs = 60", "epochs = 10")
    (Path(tmp) / "lab.toml").write_text(config)
    main(["fit", str(Path(tmp) / "lab.toml"), "--no-progress"])
    shutil.copy(Path(tmp) / "pima_out" / "arviz.nc", sys.argv[1])
