"""The trunk exported to ONNX once per checkpoint, into a cache folder only this user can write."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import tempfile
import warnings
from pathlib import Path

import torch

from steelsight.model.inference.backends.base import TrunkInput
from steelsight.model.inference.network import AttentionResNet50

log = logging.getLogger("steelsight.model")
ONNX_LAYOUT = 2  # bump when the exported graph's outputs change: v2 added layer3 texture statistics


def export_onnx(net: AttentionResNet50, path: Path, size: int) -> Path:
    """Export the trunk with dynamic batch and spatial size (legacy exporter: no extra dependencies)."""
    example = torch.zeros(2, 1, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the gray-input branch is traced as taken
        torch.onnx.export(
            TrunkInput(net).eval(), (example,), str(path), input_names=["gray"],
            output_names=["features", "texture"],
            dynamic_axes={"gray": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch", 2: "h", 3: "w"},
                          "texture": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    return path


class UntrustedCacheDir(OSError):
    """A cache folder that someone else could have written model files into."""


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can write, created 0700 when missing.

    The ONNX files in it are loaded and run, so a folder that is a symlink, belongs to
    another user or is writable by group or others is refused, never reused.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UntrustedCacheDir(f"{path} is not a plain folder")
    if info.st_uid != os.getuid():
        raise UntrustedCacheDir(f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & 0o022:
        raise UntrustedCacheDir(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")
    return path


@functools.lru_cache(maxsize=1)
def _process_private_dir() -> Path:
    """Last resort: a fresh, unpredictable folder for this process (the export is redone next start)."""
    return Path(tempfile.mkdtemp(prefix="steelsight-onnx-"))


def cache_dir() -> Path:
    """$STEELSIGHT_CACHE/onnx, else a private temp folder (a container's read-only home); never a shared one."""
    root = Path(os.environ.get("STEELSIGHT_CACHE", Path.home() / ".cache" / "steelsight")) / "onnx"
    fallback = Path(tempfile.gettempdir()) / f"steelsight-onnx-{os.getuid()}"
    for candidate in (root, fallback):
        try:
            return private_dir(candidate)
        except OSError as exc:
            log.warning("ONNX cache %s not used: %s", candidate, exc)
    return _process_private_dir()


def cached_onnx(net: AttentionResNet50, size: int, cache_key: str) -> Path:
    """The trunk exported once per checkpoint into the cache folder."""
    path = cache_dir() / f"trunk-v{ONNX_LAYOUT}-{cache_key[:16]}-{size}.onnx"
    if not path.exists():
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            export_onnx(net, tmp_path, size)
            os.replace(tmp_path, path)  # atomic: concurrent workers never read a half-written model
        finally:
            tmp_path.unlink(missing_ok=True)
        # the same checkpoint's export in the layout before versioned names (~90 MB each); a worker
        # still running it keeps its open file, since unlinking does not close it
        (path.parent / f"trunk-{cache_key[:16]}-{size}.onnx").unlink(missing_ok=True)
    return path
