"""Shared test configuration."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Devices that device-sensitive tests are parametrised over: the CPU always, and CUDA
# where this machine has one (CI has no GPU: there they run on the CPU, nothing skipped).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def shared_data(name: str) -> Path:
    """Path of a file in ../shared/data; skips (or fails under CI) when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        reason = f"../shared/data/{name} is absent (real data for this test is not on this machine)"
        if os.environ.get("CEBMF_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + "; CEBMF_REQUIRE_SHARED_DATA=1 requires it")
        pytest.skip(reason)
    return path
