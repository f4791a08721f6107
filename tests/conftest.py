"""Fixtures every tier shares (tiny checkpoints, the NEU folder) and the tier markers.

A test's tier is its folder: ``tests/unit`` (no server, no shipped model; ``make test-fast``),
``tests/model`` (the shipped checkpoint, the ImageNet port, or training) and
``tests/integration`` (real Redis, SeaweedFS, worker processes, Chromium). The server
fixtures live in ``tests/integration/conftest.py``, so a unit test cannot reach them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from steelsight.model.inference.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from steelsight.model.inference.network import AttentionResNet50
from steelsight.model.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
NEU = REPO.parent / "shared" / "data" / "neu"

pytest_plugins = ["tests.watchdog"]


@pytest.fixture(scope="session")
def neu_dir() -> Path:
    if not (NEU / "images").is_dir():
        pytest.skip(f"NEU data not found at {NEU}")
    return NEU


def random_checkpoint(folder: Path, input_size: int) -> Path:
    """A random-init network: fast, and enough to exercise every code path."""
    torch.manual_seed(0)
    path = folder / f"random-{input_size}.safetensors"
    save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(input_size=input_size), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), 64)


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint) -> Predictor:
    return Predictor(load_checkpoint(tiny_checkpoint), torch.device("cpu"), batch_size=4)


TIERS = ("unit", "model", "integration")
MIN_FREE_GB = 4  # the suite's peak under tmp is about 3 GB: SeaweedFS volumes, checkpoints, training runs


def pytest_configure(config):
    """Split the cores between xdist's workers, and refuse to start on a nearly full disk."""
    if hasattr(config, "workerinput"):
        return  # the controller does both, once
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 1:
        # read when torch starts in each worker; the ONNX Runtime and OpenVINO trunks take torch's count.
        # Workers that each take every core spin-wait against each other, and the model tests run
        # several times slower
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    # a full disk makes the S3 store refuse writes and the producers wait forever: say so up front
    free = shutil.disk_usage(tempfile.gettempdir()).free / 1e9
    if free < MIN_FREE_GB:
        raise pytest.UsageError(f"{free:.1f} GB free under {tempfile.gettempdir()}; the tests need {MIN_FREE_GB} GB "
                                "(earlier runs' folders are under pytest-of-<user>; set TMPDIR to a larger disk)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = next((t for t in TIERS if f"/tests/{t}/" in str(item.path)), None)
        if tier:
            item.add_marker(tier)
