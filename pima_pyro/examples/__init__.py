"""An example lab data set and run config (``lab.nc``, ``lab.toml``): ``pima-pyro fit``."""

from pathlib import Path

#: The folder holding ``lab.toml`` and ``lab.nc``.
EXAMPLES = Path(__file__).resolve().parent
