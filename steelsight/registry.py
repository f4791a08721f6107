"""The model registry: checkpoints in the object store, the live and shadow pointers in Redis.

A checkpoint is stored once under ``models/<sha256>.safetensors`` (its own hash names it)
with a card beside it (:class:`RegisteredModel`). Which one the line serves is one Redis
key (``Settings.model_live_key``); earlier live models are a list for rollback, and every
change is a line in an audit stream (:class:`ModelEvent`). Workers follow the pointers
(:mod:`worker.models`); nothing here loads a model for serving.
"""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from steelsight.clients import MissingObject, ObjectStore
from steelsight.contract import (
    MODELS_PREFIX,
    SHA256_PATTERN,
    ModelEvent,
    RegisteredModel,
    Settings,
    WorkerModelState,
    model_card_key,
    model_object_key,
)
from steelsight.model.inference.checkpoint import CheckpointError, file_sha256, load_checkpoint

log = logging.getLogger("steelsight.registry")

HISTORY_MAX = 100  # earlier live models kept for rollback
AUDIT_MAXLEN = 10_000
SHA_PREFIX_MIN = 8  # a model may be named by this many leading hex digits when they are unique

# promote: the pointer, the history and the audit line change together or not at all
PROMOTE = """
local previous = redis.call('GET', KEYS[1])
if previous == ARGV[1] then return {0, previous} end
redis.call('SET', KEYS[1], ARGV[1])
if previous then
  redis.call('LPUSH', KEYS[2], previous)
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
end
local event = cjson.decode(ARGV[2])
event['previous'] = previous or cjson.null
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', cjson.encode(event))
-- the shadowed model promoted: it has no challenger to be any more
if redis.call('HGET', KEYS[4], 'sha256') == ARGV[1] then redis.call('DEL', KEYS[4]) end
return {1, previous or false}
"""

ROLLBACK = """
local target = redis.call('LPOP', KEYS[2])
if not target then return {0, false} end
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], target)
local event = cjson.decode(ARGV[1])
event['sha256'] = target
event['previous'] = previous or cjson.null
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'event', cjson.encode(event))
return {1, target}
"""


class RegistryError(RuntimeError):
    """A model that is not in the registry, a name that matches several, nothing to roll back to."""


def operator_name() -> str:
    """Who runs a ``model`` command, for the audit log: ``STEELSIGHT_OPERATOR``, else the login name."""
    return os.environ.get("STEELSIGHT_OPERATOR") or os.environ.get("USER") or "unknown"


class ModelRegistry:
    def __init__(self, settings: Settings, store: ObjectStore, connection):
        self.settings, self.store, self.redis = settings, store, connection
        self.bucket = settings.library_bucket

    # -- the object store

    def push(self, path: str | Path, by: str) -> RegisteredModel:
        """Store a checkpoint and its card; pushing the same file again changes nothing."""
        path = Path(path)
        try:
            checkpoint = load_checkpoint(path)  # a file no worker could load is refused here, not at promote
        except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
            raise RegistryError(f"{path} is not a loadable checkpoint: {exc}") from exc
        sha = file_sha256(path)
        size = path.stat().st_size
        if self.store.exists(self.bucket, model_card_key(sha)):
            if self.store.size(self.bucket, model_object_key(sha)) != size:  # lost or damaged since: mend it
                self.store.put_file(self.bucket, model_object_key(sha), path, "application/octet-stream")
                log.warning("models/%s.safetensors was missing or damaged in the store; uploaded again", sha)
            return self.card(sha)
        meta = checkpoint.meta
        card = RegisteredModel(
            sha256=sha, size=size, name=path.name, pushed_at=datetime.now(UTC), pushed_by=by,
            classes=list(meta.classes), input_size=int(meta.input_size),
            metrics={k: float(v) for k, v in (meta.val_metrics or {}).items() if isinstance(v, int | float)})
        self.store.put_file(self.bucket, model_object_key(sha), path, "application/octet-stream")
        # the card last: a card names a file that is there
        self.store.put(self.bucket, model_card_key(sha), card.model_dump_json(indent=1).encode(), "application/json")
        self._audit(ModelEvent(action="push", sha256=sha, by=by))
        return card

    def card(self, sha: str) -> RegisteredModel:
        try:
            return RegisteredModel.model_validate_json(self.store.get(self.bucket, model_card_key(sha)))
        except MissingObject as exc:
            raise RegistryError(f"model {sha[:12]}… is not in the registry (`steelsight model list`)") from exc

    def list(self) -> list[RegisteredModel]:
        """Every registered model, newest push first."""
        cards = []
        for key in self.store.list_keys(self.bucket, MODELS_PREFIX):
            if key.endswith(".json"):
                try:
                    cards.append(RegisteredModel.model_validate_json(self.store.get(self.bucket, key)))
                except (MissingObject, ValueError) as exc:
                    log.warning("skipping unreadable model card %s: %s", key, exc)
        return sorted(cards, key=lambda c: c.pushed_at, reverse=True)

    def resolve(self, name: str) -> str:
        """The full sha256 of a registered model named by its sha256 or a unique prefix of it."""
        name = name.strip().lower()
        if SHA256_PATTERN.match(name):
            self.card(name)
            return name
        if len(name) < SHA_PREFIX_MIN or not all(c in "0123456789abcdef" for c in name):
            raise RegistryError(f"{name!r}: name a model by its sha256 or at least {SHA_PREFIX_MIN} of its leading "
                                "hex digits")
        matches = [c.sha256 for c in self.list() if c.sha256.startswith(name)]
        if len(matches) != 1:
            which = f": {', '.join(m[:16] for m in matches)}" if matches else " (`steelsight model list`)"
            raise RegistryError(f"{name!r} matches {len(matches)} registered models{which}")
        return matches[0]

    def fetch(self, sha: str, cache_dir: str | Path) -> Path:
        """The checkpoint as a local file, downloaded once into ``cache_dir`` and verified against its name."""
        folder = Path(cache_dir).expanduser()
        target = folder / f"{sha}.safetensors"
        if target.is_file() and file_sha256(target) == sha:
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        try:
            self.store.get_file(self.bucket, model_object_key(sha), tmp)
            got = file_sha256(Path(tmp))
            if got != sha:
                raise RegistryError(f"models/{sha[:12]}… downloaded with sha256 {got[:12]}…: the stored file is "
                                    "corrupt")
            os.replace(tmp, target)  # atomic: a reader never sees half a file
        except MissingObject as exc:
            raise RegistryError(f"model {sha[:12]}… has no file in the registry") from exc
        finally:
            Path(tmp).unlink(missing_ok=True)
        return target

    # -- the pointers in Redis

    def live(self) -> str | None:
        value = self.redis.get(self.settings.model_live_key)
        return value.decode() if isinstance(value, bytes) else value

    def history(self) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else v
                for v in self.redis.lrange(self.settings.model_history_key, 0, -1)]

    def promote(self, sha: str, by: str) -> str | None:
        """Make a registered model the live one; the model it replaces (None if none) goes to the history."""
        self.card(sha)
        event = ModelEvent(action="promote", sha256=sha, by=by)
        s = self.settings
        changed, previous = self.redis.eval(PROMOTE, 4, s.model_live_key, s.model_history_key, s.model_audit_stream,
                                            s.model_shadow_key, sha, event.model_dump_json(), HISTORY_MAX,
                                            AUDIT_MAXLEN)
        if not changed:
            raise RegistryError(f"model {sha[:12]}… is already live")
        return previous.decode() if isinstance(previous, bytes) else previous or None

    def rollback(self, by: str) -> str:
        """Go back to the model live before the current one; returns its sha256."""
        s = self.settings
        event = ModelEvent(action="rollback", by=by)
        changed, target = self.redis.eval(ROLLBACK, 3, s.model_live_key, s.model_history_key, s.model_audit_stream,
                                          event.model_dump_json(), AUDIT_MAXLEN)
        if not changed:
            raise RegistryError("nothing to roll back to: no model was live before this one")
        return target.decode() if isinstance(target, bytes) else target

    def shadow(self, sha: str, share: float, by: str) -> None:
        """Have workers also score ``share`` of the live frames with ``sha``, without publishing its verdicts."""
        if not 0 < share <= 1:
            raise RegistryError(f"--share must be in (0, 1], not {share}")
        self.card(sha)
        with self.redis.pipeline() as pipe:  # MULTI: the pointer and its audit line together
            pipe.delete(self.settings.model_shadow_key)
            pipe.hset(self.settings.model_shadow_key, mapping={"sha256": sha, "share": repr(share)})
            pipe.xadd(self.settings.model_audit_stream,
                      {"event": ModelEvent(action="shadow", sha256=sha, share=share, by=by).model_dump_json()},
                      maxlen=AUDIT_MAXLEN, approximate=True)
            pipe.execute()

    def shadow_off(self, by: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.settings.model_shadow_key)
            pipe.xadd(self.settings.model_audit_stream,
                      {"event": ModelEvent(action="shadow_off", by=by).model_dump_json()},
                      maxlen=AUDIT_MAXLEN, approximate=True)
            pipe.execute()

    def shadowing(self) -> tuple[str, float] | None:
        """The challenger's sha256 and share, or None."""
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in self.redis.hgetall(self.settings.model_shadow_key).items()}
        if not data.get("sha256"):
            return None
        try:
            return data["sha256"], float(data.get("share", "0"))
        except ValueError:
            return None

    def workers(self) -> list[WorkerModelState]:
        """Each worker's model as it last reported it (every ``model_poll_s``), by name."""
        states = [WorkerModelState.model_validate_json(v) for v in self.redis.hvals(self.settings.model_workers_key)]
        return sorted(states, key=lambda w: w.worker)

    def status(self) -> dict:
        """Live and shadow models, the shadow's agreement, each worker's model, the audit log: as data."""
        shadow, live = self.shadowing(), self.live()
        # agreement against the model the workers serve: the live one, or their configured one before any promote
        champion = live or next((w.sha256 for w in self.workers()), None)
        return {
            "live": live, "history": self.history()[:5],
            "shadow": {"sha256": shadow[0], "share": shadow[1], "against": champion,
                       "agreement": shadow_stats(self.redis, self.settings, shadow[0], champion) if champion else {},
                       "disagreements": shadow_disagreements(self.redis, self.settings, shadow[0], champion, 20)
                       if champion else []}
            if shadow else None,
            "workers": [w.model_dump(mode="json") for w in self.workers()],
            "audit": [e.model_dump(mode="json") for e in self.audit()],
        }

    def audit(self, count: int = 50) -> list[ModelEvent]:
        """The newest ``count`` audit events, newest first."""
        entries = self.redis.xrevrange(self.settings.model_audit_stream, count=count)
        events = []
        for _, fields in entries:
            raw = fields.get(b"event", fields.get("event"))
            events.append(ModelEvent.model_validate_json(raw))
        return events

    def _audit(self, event: ModelEvent) -> None:
        self.redis.xadd(self.settings.model_audit_stream, {"event": event.model_dump_json()}, maxlen=AUDIT_MAXLEN,
                        approximate=True)


def shadow_stats(connection, settings: Settings, sha: str, champion: str) -> dict[str, dict[str, int]]:
    """Per live verdict of ``champion``: frames both models read and those they agreed on
    (``{verdict: {frames, agree}}``)."""
    raw = connection.hgetall(settings.shadow_stats_key(sha, champion))
    stats: dict[str, dict[str, int]] = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        kind, _, verdict = key.partition(":")
        stats.setdefault(verdict, {"frames": 0, "agree": 0})[kind] = int(value)
    return stats


def shadow_disagreements(connection, settings: Settings, sha: str, champion: str, count: int = 50) -> list[dict]:
    """The newest frames the challenger labelled differently: job id, line, champion and challenger verdicts."""
    out = []
    for _, fields in connection.xrevrange(settings.shadow_disagree_stream(sha, champion), count=count):
        out.append({(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in fields.items()})
    return out
