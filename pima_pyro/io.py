"""Lab data in and out: xarray (NetCDF, Zarr), plain arrays, data frames and NPZ files.

The xarray layout (what :func:`to_xarray` writes and :func:`from_xarray` reads by default):

* one data variable per modality, its first dimension the sample dimension (``sample``);
  unobserved entries are NaN;
* ``<name>_observed`` (sample,) bool: the mask, so that a modality observed with a NaN-free
  value and one missing are told apart without relying on NaN;
* a physics modality's curve dimension is ``<name>_t`` with the grid as its coordinate;
* ``label`` (sample,) integers when the data have labels;
* the dataset attribute ``pima_physics`` lists the physics modalities.

Files a lab writes itself need only the modality variables: masks then come from NaN (a sample
with any NaN in a modality lacks it) and grids from the coordinate named in ``physics``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from pima_pyro.data import MultimodalData

MASK_SUFFIX = "_observed"
LABEL_VARIABLE = "label"


def to_xarray(data: MultimodalData, sample_dim: str = "sample") -> xr.Dataset:
    """``data`` as a Dataset in the layout of the module docstring (NaN where unobserved)."""
    variables: dict[str, Any] = {}
    coords: dict[str, Any] = {sample_dim: np.arange(data.n_samples)}
    for name, values in data.values.items():
        array = values.numpy().copy()
        observed = data.masks[name].numpy()
        array[~observed] = np.nan
        if name in data.grids:
            dims = [sample_dim, f"{name}_t"]
            coords[f"{name}_t"] = data.grids[name].numpy()
        else:
            dims = [sample_dim] + [f"{name}_dim_{i}" for i in range(array.ndim - 1)]
        variables[name] = (dims, array)
        variables[f"{name}{MASK_SUFFIX}"] = ([sample_dim], observed)
    if data.labels is not None:
        variables[LABEL_VARIABLE] = ([sample_dim], data.labels.numpy())
    dataset = xr.Dataset(variables, coords=coords)
    dataset.attrs["pima_physics"] = ",".join(sorted(data.grids))
    return dataset


def from_xarray(
    dataset: xr.Dataset,
    sample_dim: str = "sample",
    physics: Mapping[str, str] | None = None,
    modalities: Sequence[str] | None = None,
    labels: str | None = LABEL_VARIABLE,
) -> MultimodalData:
    """A :class:`MultimodalData` from a Dataset.

    Args:
        sample_dim: the dimension that indexes samples (first dimension of every modality).
        physics: ``name -> coordinate`` of each physics modality's grid; default: the
            ``pima_physics`` attribute with coordinates ``<name>_t``.
        modalities: the variables to read; default every variable with ``sample_dim`` that is
            neither a mask (``<name>_observed``) nor ``labels``.
        labels: the variable holding integer labels, if present.
    """
    if not isinstance(dataset, xr.Dataset):
        raise TypeError(f"from_xarray: expected an xarray.Dataset, got {type(dataset).__name__}")
    if sample_dim not in dataset.dims:
        raise ValueError(
            f"from_xarray: sample_dim={sample_dim!r} is not a dimension of the dataset "
            f"(dimensions {list(dataset.dims)})"
        )
    if physics is None:
        listed = dataset.attrs.get("pima_physics", [])
        listed = listed.split(",") if isinstance(listed, str) else list(listed)
        listed = [n for n in listed if n]
        physics = {str(n): f"{n}_t" for n in listed}  # NetCDF stores a 1-list as a string
    names = (
        list(modalities) if modalities is not None else _modality_names(dataset, sample_dim, labels)
    )
    values, masks, grids = {}, {}, {}
    for name in names:
        if name not in dataset.data_vars:
            raise ValueError(f"from_xarray: modality '{name}' is not a variable of the dataset")
        array = dataset[name]
        if array.dims[0] != sample_dim:
            array = array.transpose(sample_dim, ...)
        raw = np.asarray(array.values, dtype=np.float32)
        mask_name = f"{name}{MASK_SUFFIX}"
        if mask_name in dataset.data_vars:
            masks[name] = np.asarray(dataset[mask_name].values, dtype=bool)
        else:
            masks[name] = ~np.isnan(raw.reshape(raw.shape[0], -1)).any(1)
        values[name] = raw  # MultimodalData zeroes what the mask leaves out
        if name in physics:
            grids[name] = _grid(dataset, array, name, physics[name])
    label_values = None
    if labels is not None and labels in dataset.data_vars:
        label_values = np.asarray(dataset[labels].values)
    return MultimodalData(values, masks=masks, grids=grids, labels=label_values)


def _modality_names(dataset: xr.Dataset, sample_dim: str, labels: str | None) -> list[str]:
    return [
        str(n)
        for n, v in dataset.data_vars.items()
        if sample_dim in v.dims and not str(n).endswith(MASK_SUFFIX) and n != labels
    ]


def _grid(dataset: xr.Dataset, array: xr.DataArray, name: str, coordinate: str) -> np.ndarray:
    if coordinate not in dataset.coords:
        raise ValueError(
            f"from_xarray: physics modality '{name}' needs its grid coordinate {coordinate!r}; "
            f"the dataset has coordinates {list(dataset.coords)}"
        )
    grid = dataset.coords[coordinate]
    if grid.ndim != 1 or grid.dims[0] not in array.dims:
        raise ValueError(
            f"from_xarray: coordinate {coordinate!r} must be 1-D along a dimension of '{name}'"
        )
    return np.asarray(grid.values, dtype=np.float64)


def read_dataset(path: str | os.PathLike[str]) -> xr.Dataset:
    """A NetCDF (``.nc``) or Zarr (a folder, ``.zarr``) file, loaded into memory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix == ".zarr":
        return xr.open_zarr(path).load()
    with xr.open_dataset(path) as opened:
        return opened.load()


def from_arrays(
    columns: Mapping[str, object], groups: Mapping[str, Sequence[str]], **kwargs: Any
) -> MultimodalData:
    """Tabular modalities: ``groups`` maps each modality to the columns of ``columns`` (a
    mapping of 1-D arrays, or a pandas ``DataFrame``) that make it, in order; NaN marks a
    missing entry (the sample then lacks that modality). ``kwargs`` go to
    :class:`MultimodalData` (``labels``, ``grids``, ``masks``)."""
    values = {}
    for name, cols in groups.items():
        missing = [c for c in cols if c not in columns]
        if missing:
            raise ValueError(f"from_arrays: modality '{name}' names unknown columns {missing}")
        values[name] = np.stack([np.asarray(columns[c], dtype=np.float64) for c in cols], axis=1)
    return MultimodalData(values, nan_as_missing=True, **kwargs)


def from_npz(path: str | os.PathLike[str], physics: Sequence[str] = ()) -> MultimodalData:
    """An NPZ file holding one array per modality (NaN where missing), optional ``label`` and
    ``<name>_t`` grids for the physics modalities named in ``physics``. Read without pickle."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    grids = {}
    for name in physics:
        if f"{name}_t" not in arrays:
            raise ValueError(f"from_npz: physics modality '{name}' needs the array '{name}_t'")
        grids[name] = arrays.pop(f"{name}_t")
    labels = arrays.pop(LABEL_VARIABLE, None)
    return MultimodalData(arrays, grids=grids, labels=labels, nan_as_missing=True)
