"""Shared fixtures: tiny models built once per test session, and the ``gpu`` marker."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (run on the device machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on two CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
