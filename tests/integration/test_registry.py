"""The model registry against real Redis and SeaweedFS, and the `steelsight model` command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from steelsight.clients import ObjectStore, redis_client
from steelsight.contract import model_object_key
from steelsight.model.inference.checkpoint import CheckpointMeta, file_sha256, save_checkpoint
from steelsight.model.inference.network import AttentionResNet50
from steelsight.registry import ModelRegistry, RegistryError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = folder / f"m{seed}.safetensors"
        save_checkpoint(AttentionResNet50().eval(), CheckpointMeta(input_size=64, val_metrics={"accuracy": 0.5}),
                        path)
        out.append(path)
    junk = folder / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    return [*out, junk]


@pytest.fixture()
def registry(settings):
    store = ObjectStore(settings)
    store.ensure_buckets()
    return ModelRegistry(settings, store, redis_client(settings))


def test_push_list_promote_rollback_and_audit(registry, files, tmp_path):
    a, b, junk = files
    card = registry.push(a, "ana")
    assert card.sha256 == file_sha256(a) and card.metrics == {"accuracy": 0.5} and card.input_size == 64
    assert registry.push(a, "ana") == card  # idempotent: the same file is stored once
    sha_b = registry.push(b, "ben").sha256
    assert {c.sha256 for c in registry.list()} == {card.sha256, sha_b}
    with pytest.raises(RegistryError, match="not a loadable checkpoint"):
        registry.push(junk, "ana")
    assert registry.resolve(sha_b[:10]) == sha_b
    with pytest.raises(RegistryError, match="at least 8"):
        registry.resolve(sha_b[:4])
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.promote("0" * 64, "ana")

    assert registry.live() is None
    assert registry.promote(card.sha256, "ana") is None
    assert registry.promote(sha_b, "ben") == card.sha256
    with pytest.raises(RegistryError, match="already live"):
        registry.promote(sha_b, "ben")
    assert registry.rollback("cy") == card.sha256 and registry.live() == card.sha256
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("cy")
    events = registry.audit()
    assert [(e.action, e.by) for e in events][:3] == [("rollback", "cy"), ("promote", "ben"), ("promote", "ana")]
    assert events[0].previous == sha_b and events[1].previous == card.sha256

    path = registry.fetch(sha_b, tmp_path / "cache")
    assert file_sha256(path) == sha_b and registry.fetch(sha_b, tmp_path / "cache") == path
    registry.store.put(registry.bucket, model_object_key(sha_b), b"tampered", "application/octet-stream")
    path.unlink()
    with pytest.raises(RegistryError, match="corrupt"):
        registry.fetch(sha_b, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # no half file left behind
    registry.push(b, "ben")  # pushing the file again mends the stored copy
    assert file_sha256(registry.fetch(sha_b, tmp_path / "cache")) == sha_b


def test_shadow_pointer(registry, files):
    sha = registry.push(files[0], "ana").sha256
    with pytest.raises(RegistryError, match="share"):
        registry.shadow(sha, 1.5, "ana")
    registry.shadow(sha, 0.25, "ana")
    assert registry.shadowing() == (sha, 0.25)
    registry.shadow_off("ana")
    assert registry.shadowing() is None
    assert [e.action for e in registry.audit()][:2] == ["shadow_off", "shadow"]
    registry.shadow(sha, 0.25, "ana")
    registry.promote(sha, "ana")  # the challenger made live has no one to shadow
    assert registry.shadowing() is None


def run_cli(settings, *args) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"} | settings.to_env() | {"STEELSIGHT_OPERATOR": "dora"}
    return subprocess.run([sys.executable, "-m", "steelsight.cli", "model", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_model_command(settings, files):
    a = files[0]
    pushed = run_cli(settings, "push", str(a), "--promote")
    assert pushed.returncode == 0, pushed.stderr
    sha = file_sha256(a)
    assert sha in pushed.stdout
    listed = run_cli(settings, "list")
    assert listed.stdout.startswith(f"* {sha[:16]}") and "dora" in listed.stdout
    status = run_cli(settings, "status")
    assert f"live:    {sha}" in status.stdout and "promote" in status.stdout
    refused = run_cli(settings, "rollback")  # nothing before it: refused with the reason, exit 2
    assert refused.returncode == 2 and "nothing to roll back" in refused.stderr
