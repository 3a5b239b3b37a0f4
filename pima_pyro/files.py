"""Model files that hold data only: a JSON header and tensors, with a SHA-256 digest of both.

A model file is ``torch.save({"header": JSON string, "digest": hex, "tensors": {name:
tensor}})`` read back with ``torch.load(weights_only=True)``: the unpickler accepts tensors
and plain containers only, so a file cannot run code. The header holds the modality specs as
data (built-in experts by class name and arguments; a :class:`~pima_pyro.models.experts.Custom`
expert by the import path of its function, its parameter shapes, priors and start), the
versions and the history. The digest covers the header and every tensor's dtype, shape and
bytes; any change gives :class:`PIMAFileError`, as does every other reason a file cannot be
read (truncated, empty, foreign, older or newer layout), naming the path and the cause.

A Custom expert's function is found, at load, in a module that this process has already
imported (a file never makes pima-pyro import anything), or is re-supplied to
``PIMA.load(path, experts={name: Custom(...)})``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch

from pima_pyro.models import experts as expert_classes
from pima_pyro.models.experts import Custom, PhysicsExpert
from pima_pyro.models.modalities import (
    BernoulliModality,
    GaussianModality,
    Modality,
    PhysicsModality,
)

#: Layout of model files (2: JSON header + tensors + digest; 1 was a pickle of objects).
FILE_FORMAT = 2
SPEC_CLASSES = {c.kind: c for c in (GaussianModality, BernoulliModality, PhysicsModality)}
BUILTIN_EXPERTS = ("Polynomial", "Affine", "LinearThroughOrigin", "ExponentialDecay",
                   "BilinearStressStrain")  # fmt: skip


class PIMAFileError(ValueError):
    """A model file or checkpoint that cannot be used: unreadable, truncated, corrupted
    (digest mismatch), foreign, or of another format; the message names the path and cause."""


# ---- specs as data ---------------------------------------------------------------------------
def function_path(fn: Callable[..., Any], where: str) -> str:
    """``"module:qualname"`` of a module-level function, or a ``ValueError`` saying why not."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise ValueError(
            f"{where}: the Custom expert's function {qualname or fn!r} is not importable (a "
            "lambda, a nested function or one defined in __main__); define it at module level "
            "in a module, or save without it and re-supply the expert to PIMA.load(path, "
            "experts={name: Custom(...)})"
        )
    return f"{module}:{qualname}"


def resolve_function(path: str, where: str) -> Callable[..., Any]:
    """The function at ``"module:qualname"`` in an ALREADY imported module (never imports)."""
    module_name, _, qualname = path.partition(":")
    if module_name not in sys.modules or module_name.split(".")[0] in sys.stdlib_module_names:
        raise PIMAFileError(
            f"{where}: the Custom expert's function {path!r} is not in a module this process "
            "has imported; import that module first, or pass the expert to "
            "PIMA.load(path, experts={name: Custom(...)})"
        )
    obj: Any = sys.modules[module_name]
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    # defined in that module: an attribute chain must not reach into another module (os.system)
    if not callable(obj) or isinstance(obj, type(sys)) or obj.__module__ != module_name:
        raise PIMAFileError(f"{where}: {path!r} names no function defined in {module_name}")
    return obj


def distribution_to_data(prior: torch.distributions.Distribution, where: str) -> dict:
    """A prior as ``{"family", "params", "reinterpreted"}`` (torch/Pyro families only)."""
    reinterpreted = 0
    while isinstance(prior, torch.distributions.Independent):
        reinterpreted += prior.reinterpreted_batch_ndims
        prior = prior.base_dist
    family = type(prior).__name__
    if not hasattr(dist, family) or not prior.arg_constraints:
        raise ValueError(f"{where}: a prior of type {family} cannot be written to a file")
    given = [
        k
        for k in prior.arg_constraints
        if k in prior.__dict__ or isinstance(getattr(type(prior), k, None), property)
    ]  # the parameters it was made with, not the lazily derived alternatives (probs/logits)
    params = {k: torch.as_tensor(getattr(prior, k)).tolist() for k in given}
    return {"family": family, "params": params, "reinterpreted": reinterpreted}


def distribution_from_data(data: Mapping[str, Any]) -> torch.distributions.Distribution:
    family = getattr(dist, str(data["family"]), None)
    if not (isinstance(family, type) and issubclass(family, torch.distributions.Distribution)):
        raise PIMAFileError(f"unknown prior family {data['family']!r}")
    prior = family(**{k: torch.tensor(v) for k, v in data["params"].items()})
    reinterpreted = int(data["reinterpreted"])
    return prior.to_event(reinterpreted) if reinterpreted else prior


def expert_to_data(expert: PhysicsExpert, where: str) -> dict:
    name = type(expert).__name__
    if isinstance(expert, Custom):
        return {
            "class": "Custom",
            "fn": function_path(expert.fn, where),
            "param_shapes": {k: list(v) for k, v in expert.param_shapes.items()},
            "priors": {k: distribution_to_data(p, where) for k, p in expert.priors.items()},
            "init": {k: v.tolist() for k, v in expert.init.items()},
        }
    if name not in BUILTIN_EXPERTS:
        raise ValueError(
            f"{where}: expert {name} is neither built in nor Custom; re-supply it to "
            "PIMA.load(path, experts={name: ...})"
        )
    args = {"degree": expert.degree} if name == "Polynomial" else {}
    if name == "BilinearStressStrain":
        args = {"sharpness": float(expert.sharpness)}
    return {"class": name, "args": args}


def expert_from_data(data: Mapping[str, Any], where: str) -> PhysicsExpert:
    name = data.get("class")
    if name == "Custom":
        return Custom(
            resolve_function(str(data["fn"]), where),
            {k: tuple(v) for k, v in data["param_shapes"].items()},
            priors={k: distribution_from_data(v) for k, v in data["priors"].items()} or None,
            init={k: torch.tensor(v) for k, v in data["init"].items()} or None,
        )
    if name not in BUILTIN_EXPERTS:
        raise PIMAFileError(f"{where}: unknown expert class {name!r}")
    return getattr(expert_classes, name)(**data.get("args", {}))


def spec_to_data(name: str, spec: Modality) -> dict:
    where = f"modality '{name}'"
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    out: dict[str, Any] = {"kind": spec.kind}
    for key, value in fields.items():
        if key == "expert":
            out[key] = None if value is None else expert_to_data(value, where)
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def spec_from_data(
    name: str, data: Mapping[str, Any], experts: Mapping[str, PhysicsExpert]
) -> Modality:
    cls = SPEC_CLASSES.get(str(data.get("kind")))
    if cls is None:
        raise PIMAFileError(f"modality '{name}': unknown kind {data.get('kind')!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = data.get(f.name, f.default)
        if f.name == "expert":
            value = experts.get(name) or (None if value is None else expert_from_data(value, name))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


# ---- the file ----------------------------------------------------------------------------------
def digest(header: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header and, in name order, every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tree_digest(tree: object) -> str:
    """SHA-256 of a nested structure of dicts, lists and tuples: each leaf's path and its
    tensor bytes (as :func:`digest`) or its ``repr``; dict keys in sorted order."""
    h = hashlib.sha256()
    _update_tree(h, "", tree)
    return h.hexdigest()


def _update_tree(h: Any, path: str, node: object) -> None:
    if isinstance(node, dict):
        for key in sorted(node, key=str):
            _update_tree(h, f"{path}/{key}", node[key])
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            _update_tree(h, f"{path}[{i}]", item)
    elif isinstance(node, torch.Tensor):
        h.update(digest(path, {"": node}).encode())
    else:
        h.update(f"{path}={node!r}".encode())


def write_file(
    path: str | os.PathLike[str], header: dict, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Atomically (temporary file, then rename) write ``header`` and ``tensors``."""
    text = json.dumps(header, sort_keys=True)
    cpu = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    payload = {"format": FILE_FORMAT, "header": text, "digest": digest(text, cpu), "tensors": cpu}
    atomic_torch_save(payload, path)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """``write(tmp)`` on ``<name>.<random>.tmp`` beside ``path``, then rename it to ``path``: a
    kill during the write leaves the old file (and a temporary, which the next fit removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, partial(torch.save, obj))


def read_file(path: str | os.PathLike[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(header, tensors)`` of a file written by :func:`write_file`, digest checked."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, empty, foreign, or a pickle carrying code
        raise PIMAFileError(f"{path}: not a readable pima-pyro file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise PIMAFileError(
            f"{path}: not a pima-pyro model file of format {FILE_FORMAT} (found {found!r}); "
            "files of format 1 were pickles: load them with pima-pyro 0.1 and save them again"
        )
    header, tensors = payload.get("header"), payload.get("tensors")
    if not isinstance(header, str) or not isinstance(tensors, dict):
        raise PIMAFileError(f"{path}: the file lacks its header or tensors")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise PIMAFileError(f"{path}: its tensors section holds something else than tensors")
    if digest(header, tensors) != payload.get("digest"):
        raise PIMAFileError(f"{path}: corrupted (the SHA-256 digest of its contents differs)")
    try:
        return json.loads(header), tensors
    except ValueError as exc:
        raise PIMAFileError(f"{path}: unreadable header ({exc})") from exc
