"""The architecture the guide asks for, checked: one training loop, short functions in
``inference/``, and ``models/`` never importing ``inference/``."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pima_pyro"


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_function_in_inference_is_longer_than_80_lines():
    long = {
        f"{path.name}:{fn.name}": fn.end_lineno - fn.lineno + 1
        for path in (PACKAGE / "inference").glob("*.py")
        for fn in _functions(path)
        if fn.end_lineno - fn.lineno + 1 > 80
    }
    assert not long, long


def test_svi_holds_no_training_loop_and_models_never_import_inference():
    svi = (PACKAGE / "inference" / "svi.py").read_text()
    assert "def fit(" not in svi and ".step()" not in svi
    assert not (PACKAGE / "inference" / "distributed.py").exists()
    for path in (PACKAGE / "models").glob("*.py"):
        assert "pima_pyro.inference" not in path.read_text(), path.name
