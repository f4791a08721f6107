"""Shared fixtures: tiny checkpoints and the NEU folder beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steelsight.model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from steelsight.model.network import AttentionResNet50
from steelsight.model.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
NEU = REPO.parent / "shared" / "data" / "neu"


@pytest.fixture(scope="session")
def neu_dir() -> Path:
    if not (NEU / "images").is_dir():
        pytest.skip(f"NEU data not found at {NEU}")
    return NEU


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Random-init network at 64 px: fast, and enough to exercise every code path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(input_size=64), path)
    return path


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint) -> Predictor:
    return Predictor(load_checkpoint(tiny_checkpoint), torch.device("cpu"), batch_size=4)
