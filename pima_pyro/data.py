"""``MultimodalData``: named modality arrays with per-sample masks, grids and labels.

Values are stored as float32 tensors of shape ``(N, *feature_shape)``. A sample that lacks a
modality has ``masks[name][n] == False``; its stored values are zeros so that no NaN ever reaches
a likelihood, and every likelihood term of an unobserved entry is masked out of the ELBO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """What the Pyro ``model``/``guide`` consume: one (sub)set of samples, on one device.

    Attributes:
        values: ``name -> (B, *shape)`` tensors (zeros where unobserved).
        observed: ``name -> (B,)`` bool, the likelihood mask.
        indices: ``(B,)`` positions of these samples in the full data set (the plate's subsample).
        n_total: size of the full data set (the plate size, so the ELBO scales by n_total / B).
        encode: ``name -> (B,)`` bool, which modalities the guide encodes; ``None`` means
            ``observed``. Random subsets of the observed modalities go here during training.
    """

    values: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    indices: torch.Tensor
    n_total: int
    encode: dict[str, torch.Tensor] | None = None
    noise: torch.Tensor | None = None

    # ``noise`` (B, D): standard-normal draws for z (common random numbers), so that a batch
    # split across processes draws exactly what one process would (distributed training).

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def take(self, rows: slice | torch.Tensor) -> Batch:
        """The samples ``rows`` of this batch (a slice or an index tensor), same ``n_total``."""
        return Batch(
            values={n: v[rows] for n, v in self.values.items()},
            observed={n: m[rows] for n, m in self.observed.items()},
            indices=self.indices[rows],
            n_total=self.n_total,
            encode=None if self.encode is None else {n: m[rows] for n, m in self.encode.items()},
            noise=None if self.noise is None else self.noise[rows],
        )


def _as_array(name: str, field: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(
            f"modality '{name}': {field} must be an array-like of numbers, "
            f"got {type(value).__name__}"
        ) from exc
    if (
        array.dtype == object
        or np.issubdtype(array.dtype, np.complexfloating)
        or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool)
    ):
        raise TypeError(f"modality '{name}': {field} must be numeric, got dtype {array.dtype}")
    return array


class MultimodalData:
    """A multimodal data set.

    Args:
        modalities: ``name -> array`` of shape ``(N, *feature_shape)``; an ``(N,)`` array is a
            scalar modality and becomes ``(N, 1)``.
        masks: optional ``name -> (N,)`` bool; ``False`` marks the modality missing for a sample.
        grids: ``name -> (T,)`` strictly increasing grid ``t`` of each physics modality
            (T must equal the modality's feature count).
        labels: optional ``(N,)`` integer ground truth, used only for evaluation.
        nan_as_missing: treat a sample whose values contain NaN as missing that modality.
            Otherwise any NaN or inf is an error.
    """

    def __init__(
        self,
        modalities: Mapping[str, object],
        masks: Mapping[str, object] | None = None,
        grids: Mapping[str, object] | None = None,
        labels: object | None = None,
        nan_as_missing: bool = False,
    ) -> None:
        if not isinstance(modalities, Mapping) or not modalities:
            raise ValueError("MultimodalData: modalities must be a non-empty mapping name -> array")
        masks = dict(masks or {})
        grids = dict(grids or {})
        for extra, where in (
            (set(masks) - set(modalities), "masks"),
            (set(grids) - set(modalities), "grids"),
        ):
            if extra:
                raise ValueError(
                    f"MultimodalData: {where} name unknown modalities {sorted(extra)}; "
                    f"modalities are {sorted(modalities)}"
                )
        self.values: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.grids: dict[str, torch.Tensor] = {}
        n_samples: int | None = None
        first_name = ""
        for name, raw in modalities.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(
                    f"MultimodalData: modality names must be identifiers, got {name!r}"
                )
            array = _as_array(name, "values", raw).astype(np.float32)
            if array.ndim == 0:
                raise ValueError(
                    f"modality '{name}': values must have shape (N, ...), got a scalar"
                )
            if array.ndim == 1:
                array = array[:, None]
            if n_samples is None:
                n_samples, first_name = array.shape[0], name
            elif array.shape[0] != n_samples:
                raise ValueError(
                    f"modality '{name}': values have {array.shape[0]} samples but modality "
                    f"'{first_name}' has {n_samples}; every modality needs one row per sample "
                    "(mark missing rows with masks)"
                )
            if array.shape[0] == 0:
                raise ValueError(f"modality '{name}': values are empty (0 samples)")
            if name in masks:
                mask = _as_array(name, "mask", masks[name])
                if mask.shape != (array.shape[0],):
                    raise ValueError(
                        f"modality '{name}': mask must have shape ({array.shape[0]},), "
                        f"got {mask.shape}"
                    )
                if mask.dtype != bool and not np.all((mask == 0) | (mask == 1)):
                    raise ValueError(
                        f"modality '{name}': mask must be boolean (or 0/1), got values "
                        f"{np.unique(mask)[:5].tolist()}"
                    )
                mask = mask.astype(bool)
            else:
                mask = np.ones(array.shape[0], dtype=bool)
            finite = np.isfinite(array.reshape(array.shape[0], -1)).all(1)
            bad = mask & ~finite
            if bad.any():
                if not nan_as_missing:
                    first = int(np.flatnonzero(bad)[0])
                    raise ValueError(
                        f"modality '{name}': values contain NaN or inf in {int(bad.sum())} "
                        f"observed sample(s) (first: sample {first}); mark them missing with "
                        "masks or pass nan_as_missing=True"
                    )
                mask = mask & finite
            array = np.where(mask.reshape(-1, *([1] * (array.ndim - 1))), array, 0.0)
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
            self.values[name] = torch.from_numpy(np.ascontiguousarray(array))
            self.masks[name] = torch.from_numpy(mask)
        assert n_samples is not None
        self.n_samples = n_samples
        for name, raw in grids.items():
            grid = _as_array(name, "grid", raw).astype(np.float32)
            count = int(np.prod(self.values[name].shape[1:]))
            if grid.ndim != 1 or grid.shape[0] != count:
                raise ValueError(
                    f"modality '{name}': grid must have shape ({count},) to match its "
                    f"{count} features, got {grid.shape}"
                )
            if not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
                raise ValueError(f"modality '{name}': grid must be finite and strictly increasing")
            self.grids[name] = torch.from_numpy(grid)
        if labels is not None:
            lab = _as_array("labels", "labels", labels)
            if lab.shape != (n_samples,):
                raise ValueError(f"labels: expected shape ({n_samples},), got {lab.shape}")
            if lab.dtype == bool or not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
                raise ValueError("labels: expected integer class labels (no NaN, no fractions)")
            self.labels: torch.Tensor | None = torch.from_numpy(lab.astype(np.int64))
        else:
            self.labels = None

    # ---- lab data in and out (pima_pyro.io) ---------------------------------------------------
    @classmethod
    def from_xarray(cls, dataset: object, **kwargs: object) -> MultimodalData:
        """See :func:`pima_pyro.io.from_xarray`."""
        from pima_pyro.io import from_xarray

        return from_xarray(dataset, **kwargs)  # type: ignore[arg-type]

    def to_xarray(self, sample_dim: str = "sample") -> object:
        """See :func:`pima_pyro.io.to_xarray`."""
        from pima_pyro.io import to_xarray

        return to_xarray(self, sample_dim)

    # ---- basic facts -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def feature_shape(self, name: str) -> tuple[int, ...]:
        self.check_names([name])
        return tuple(self.values[name].shape[1:])

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {tuple(v.shape[1:])} ({int(self.masks[n].sum())} observed)"
            for n, v in self.values.items()
        )
        return f"MultimodalData(n_samples={self.n_samples}, {parts})"

    def check_names(self, names: Iterable[str], field: str = "given") -> None:
        for name in names:
            if name not in self.values:
                raise ValueError(
                    f"{field}: unknown modality '{name}'; this data set has {list(self.values)}"
                )

    # ---- subsets -----------------------------------------------------------------------------
    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> MultimodalData:
        """The samples at ``indices`` (integer positions, or a boolean mask of length N) as a
        new object sharing no storage."""
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        array = np.asarray(indices)
        if array.dtype == bool:
            if array.shape != (self.n_samples,):
                raise ValueError(
                    f"subset: a boolean mask needs shape ({self.n_samples},), got {array.shape}"
                )
            array = np.flatnonzero(array)
        elif array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"subset: indices must be integers or a boolean mask, got {array.dtype}"
            )
        if array.size and (array.min() < -self.n_samples or array.max() >= self.n_samples):
            raise ValueError(
                f"subset: indices must lie in [0, {self.n_samples}), got {array.max()}"
            )
        idx = torch.as_tensor(array.reshape(-1), dtype=torch.long)
        out = object.__new__(MultimodalData)
        out.values = {n: v[idx].clone() for n, v in self.values.items()}
        out.masks = {n: m[idx].clone() for n, m in self.masks.items()}
        out.grids = dict(self.grids)
        out.labels = None if self.labels is None else self.labels[idx].clone()
        out.n_samples = int(idx.shape[0])
        return out

    def with_modalities(self, names: Iterable[str]) -> MultimodalData:
        """Only the named modalities (e.g. an image-only view for cross-modal queries)."""
        names = list(names)
        self.check_names(names, field="with_modalities")
        out = self.subset(torch.arange(self.n_samples))
        out.values = {n: out.values[n] for n in names}
        out.masks = {n: out.masks[n] for n in names}
        out.grids = {n: g for n, g in out.grids.items() if n in names}
        return out

    def train_test_split(
        self, test_fraction: float = 0.3, seed: int = 0
    ) -> tuple[MultimodalData, MultimodalData]:
        """A random split (seeded): ``(train, test)``."""
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(
                f"train_test_split: test_fraction must be in (0, 1), got {test_fraction}"
            )
        rng = np.random.default_rng(seed)
        perm = rng.permutation(self.n_samples)
        n_test = int(round(test_fraction * self.n_samples))
        if n_test == 0 or n_test == self.n_samples:
            raise ValueError(
                f"train_test_split: {self.n_samples} samples cannot be split with "
                f"test_fraction={test_fraction}"
            )
        return self.subset(np.sort(perm[n_test:])), self.subset(np.sort(perm[:n_test]))

    # ---- to the model ------------------------------------------------------------------------
    def to_batch(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        indices: torch.Tensor | None = None,
    ) -> Batch:
        """The whole data set (or ``indices`` of it) as one :class:`Batch` on ``device``."""
        device = torch.device(device)
        if indices is None:
            values = {n: v.to(device=device, dtype=dtype) for n, v in self.values.items()}
            masks = {n: m.to(device) for n, m in self.masks.items()}
            idx = torch.arange(self.n_samples, device=device)
        else:
            idx_cpu = indices.cpu()
            values = {n: v[idx_cpu].to(device=device, dtype=dtype) for n, v in self.values.items()}
            masks = {n: m[idx_cpu].to(device) for n, m in self.masks.items()}
            idx = idx_cpu.to(device)
        return Batch(values=values, observed=masks, indices=idx, n_total=self.n_samples)
