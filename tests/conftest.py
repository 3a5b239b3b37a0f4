"""Test settings: one torch thread (2-core CI machines collapse under contention), fixed seeds."""

import pyro
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _logs_in_tmp(tmp_path, monkeypatch):
    """fit's default CSVLogger writes under the test's own folder, not the working tree."""
    monkeypatch.setattr("pima_pyro.inference.training.DEFAULT_LOG_DIR", str(tmp_path / "logs"))
