"""``pima-pyro fit CONFIG.toml``: a run described in a TOML file.

Layout (every key is checked; an unknown key or a wrong value is a ``ValueError`` naming the
key, e.g. ``config: [modalities.image] scale must be a positive number or "learned"``)::

    [data]
    path = "lab.nc"                  # NetCDF, Zarr folder or NPZ; relative to the config file
    sample_dim = "sample"            # optional (xarray)
    physics = { curve = "curve_t" }  # physics modality -> grid coordinate (xarray)
    labels = "label"                 # optional: integer labels, for accuracy in the metrics

    [modalities.image]               # one table per modality
    likelihood = "gaussian"          # "gaussian" | "bernoulli" | "physics"
    scale = 0.5                      # gaussian: fixed observation sd, or "learned"
    bounds = [0.0, 1.0]              # gaussian: censored to [low, high] (pixels)
    network = "mlp"                  # "mlp" | "cnn"
    hidden = [64, 32]

    [modalities.curve]
    likelihood = "physics"
    expert = "ExponentialDecay"      # a built-in name, or "package.module:function" (Custom)
    expert_args = {}                 # built-in arguments (Polynomial: { degree = 2 })
    param_shapes = { a = [1] }       # Custom only
    init = { a = [1.0] }             # Custom only: the start

    [model]
    n_clusters = 4
    latent_dim = 4
    bayesian_globals = false

    [fit]                            # any option of PIMA.fit (FitOptions)
    epochs = 100

    [output]
    dir = "pima_out"                 # relative to the config file
    num_samples = 200                # draws in the ArviZ export
    ppc_samples = 50

A ``Custom`` expert's module is imported (this is your own file, unlike a model file, which
never imports anything).
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pima_pyro.data import MultimodalData
from pima_pyro.files import BUILTIN_EXPERTS, expert_from_data
from pima_pyro.models.modalities import (
    BernoulliModality,
    GaussianModality,
    Modality,
    PhysicsModality,
)

SECTIONS = {"data", "modalities", "model", "fit", "output"}
DATA_KEYS = {"path", "sample_dim", "physics", "labels"}
MODALITY_KEYS = {"likelihood", "scale", "bounds", "network", "hidden", "continuous", "expert",
                 "expert_args", "param_shapes", "init"}  # fmt: skip
MODEL_KEYS = {"n_clusters", "latent_dim", "bayesian_globals", "prior_expert"}
OUTPUT_KEYS = {"dir", "num_samples", "ppc_samples"}


def _unknown(where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ValueError(f"config: {where} has unknown key(s) {extra}; allowed: {sorted(allowed)}")


def load_config(path: str | Path) -> dict[str, Any]:
    """The parsed and checked config, with ``data.path`` and ``output.dir`` made absolute."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config: {path} is not valid TOML ({exc})") from exc
    _unknown("the file", config, SECTIONS)
    for section in ("data", "modalities"):
        if not isinstance(config.get(section), dict) or not config[section]:
            raise ValueError(f"config: [{section}] is required")
    _unknown("[data]", config["data"], DATA_KEYS)
    if "path" not in config["data"]:
        raise ValueError('config: [data] path is required (e.g. path = "lab.nc")')
    _unknown("[model]", config.get("model", {}), MODEL_KEYS)
    _unknown("[output]", config.get("output", {}), OUTPUT_KEYS)
    for name, table in config["modalities"].items():
        _unknown(f"[modalities.{name}]", table, MODALITY_KEYS)
    root = path.resolve().parent
    config["data"]["path"] = str(root / config["data"]["path"])
    config.setdefault("output", {})
    config["output"]["dir"] = str(root / config["output"].get("dir", "pima_out"))
    for key in ("checkpoint_dir", "log_dir"):  # paths in the config are relative to it
        if key in config.get("fit", {}):
            config["fit"][key] = str(root / config["fit"][key])
    return config


def modality_spec(name: str, table: Mapping[str, Any]) -> Modality:
    """One ``[modalities.<name>]`` table as a spec."""
    where = f"[modalities.{name}]"
    likelihood = table.get("likelihood")
    common = {k: table[k] for k in ("network",) if k in table}
    if "hidden" in table:
        common["hidden"] = tuple(table["hidden"])
    if likelihood == "gaussian":
        scale = table.get("scale", 1.0)
        if scale == "learned":
            scale = None
        elif not isinstance(scale, int | float) or isinstance(scale, bool) or scale <= 0:
            raise ValueError(f'config: {where} scale must be a positive number or "learned"')
        bounds = tuple(table["bounds"]) if "bounds" in table else None
        return GaussianModality(scale=scale, bounds=bounds, **common)
    if likelihood == "bernoulli":
        return BernoulliModality(continuous=bool(table.get("continuous", True)), **common)
    if likelihood == "physics":
        return PhysicsModality(expert=_expert(where, table), **common)
    raise ValueError(
        f'config: {where} likelihood must be "gaussian", "bernoulli" or "physics", got '
        f"{likelihood!r}"
    )


def _expert(where: str, table: Mapping[str, Any]) -> Any:
    expert = table.get("expert")
    if not isinstance(expert, str):
        raise ValueError(
            f"config: {where} expert must be one of {list(BUILTIN_EXPERTS)} or "
            f'"package.module:function", got {expert!r}'
        )
    if expert in BUILTIN_EXPERTS:
        return expert_from_data({"class": expert, "args": table.get("expert_args", {})}, where)
    module, _, function = expert.partition(":")
    if not function or "param_shapes" not in table:
        raise ValueError(
            f"config: {where} expert must be one of {list(BUILTIN_EXPERTS)}, or a Custom "
            f'expert "package.module:function" with param_shapes; got expert={expert!r}'
        )
    try:
        importlib.import_module(module)  # the user's own config names the user's own module
    except ImportError as exc:
        raise ValueError(
            f"config: {where} expert: cannot import module {module!r} ({exc})"
        ) from exc
    data = {"class": "Custom", "fn": expert, "param_shapes": table["param_shapes"],
            "priors": {}, "init": table.get("init", {})}  # fmt: skip
    return expert_from_data(data, where)


def read_data(config: Mapping[str, Any]) -> MultimodalData:
    """The data set of ``[data]`` (NetCDF/Zarr through xarray, or NPZ)."""
    from pima_pyro.io import from_npz, from_xarray, read_dataset

    data_cfg = config["data"]
    path = Path(data_cfg["path"])
    physics = dict(data_cfg.get("physics", {}))
    if path.suffix == ".npz":
        return from_npz(path, physics=list(physics))
    return from_xarray(
        read_dataset(path),
        sample_dim=data_cfg.get("sample_dim", "sample"),
        physics=physics or None,
        labels=data_cfg.get("labels", "label"),
    )
