"""A worker's models: it follows the registry's live and shadow pointers and swaps without losing a frame.

A :class:`ModelWatcher` thread polls the pointers every ``model_poll_s``. A new live
model is fetched from the registry, loaded and smoke-checked on this thread while the
work loop goes on with the old one, then staged on the engine, which takes it up as it
starts its next batch (:meth:`worker.engine.FrameEngine.stage`): a batch is computed
and stamped by one model, and no frame waits for a load. A checkpoint that fails to
fetch, load or pass the smoke check is refused: the worker keeps its model, counts the
refusal (``steelsight_model_refused_total``) and reports it in Redis for the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime

from steelsight.clients import REDIS_TRANSIENT, s3_transient
from steelsight.contract import Settings, WorkerModelState
from steelsight.model.evaluation.smoke import smoke_check
from steelsight.model.inference.backends import CPU_RUNTIMES, INT8_RUNTIME
from steelsight.model.inference.backends.factory import int8_eligible
from steelsight.model.inference.backends.onnx_export import cached_onnx
from steelsight.model.inference.checkpoint import load_checkpoint
from steelsight.model.inference.device import resolve_device
from steelsight.model.inference.predictor import Predictor
from steelsight.registry import ModelRegistry

from . import metrics
from .engine import FrameEngine, Shadow
from .outcome import ShadowVerdict

log = logging.getLogger("steelsight.worker")

KEEP_LOADED = 1  # the model served before, kept in memory so a rollback to it is instant
RETRY_MAX_S = 60.0  # longest pause before loading a model again after a passing error (store down, disk full)
SHADOW_TTL_S = 7 * 24 * 3600  # shadow counts outlive a challenger's run by a week
SHADOW_DISAGREE_MAXLEN = 1_000
STATE_TTL_S = 24 * 3600  # a worker's reported state: the dashboard shows those reported in the last seconds

# count a frame once per (challenger, live model) pair, whatever retries do: the seen set decides.
# KEYS: stats, seen, disagree; ARGV: stream cap, TTL, then (job, live verdict, challenger verdict, line) per frame
RECORD_SHADOW = """
for i = 3, #ARGV, 4 do
  local job, champion, challenger, line = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('SADD', KEYS[2], job) == 1 then
    redis.call('HINCRBY', KEYS[1], 'frames:' .. champion, 1)
    if champion == challenger then
      redis.call('HINCRBY', KEYS[1], 'agree:' .. champion, 1)
    else
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'job_id', job, 'line', line,
                 'champion', champion, 'challenger', challenger)
    end
  end
end
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return 1
"""


def load_checked(path, settings: Settings, engine: FrameEngine | None = None,
                 took: dict[str, float] | None = None) -> Predictor:
    """A checkpoint loaded as the worker serves it, and smoke-checked on the bundled sample frames.

    With ``engine`` (a worker that is serving), a PyTorch trunk is built between two of its batches:
    building traces the network with torch.fx, which patches ``nn.Module.__call__`` for the whole process
    while it runs, so a batch computing at the same time would fail. Reading the file, the ONNX export
    (thread-local tracing), setting up an exported-graph runtime and the smoke check run beside the work
    loop. ``took`` gets each step's seconds.
    """
    took = {} if took is None else took
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        took[step] = time.perf_counter() - clock
        clock = time.perf_counter()

    device = resolve_device(settings.device)
    checkpoint = load_checkpoint(path, device=device)
    backend = settings.backend
    serving = engine.predictor if engine is not None else None
    size = int(checkpoint.meta.input_size)
    if backend == "auto" and serving is not None and serving.input_size == size:
        # the runtime that won for the same network at the same size: weights do not change which is faster,
        # and timing them beside a serving worker would measure the worker. int8 only where the new
        # checkpoint has a passing int8 trunk of its own; else its float32 runtime
        if serving.trunk.name in CPU_RUNTIMES:
            backend = serving.trunk.name
        elif serving.trunk.name == INT8_RUNTIME:
            backend = INT8_RUNTIME if int8_eligible(size, checkpoint.sha256) else "openvino"
    exported = device.type == "cpu" and backend in ("auto", *CPU_RUNTIMES, INT8_RUNTIME)
    if exported:
        cached_onnx(checkpoint.model, size, checkpoint.sha256)
    lap("read")

    def build() -> Predictor:
        lap("wait_for_batch")
        return Predictor(checkpoint, device, max(settings.batch_size, 1), backend, settings.unknown_false_rate)

    # an exported-graph runtime traces nothing; a PyTorch trunk (torch.fx) must not overlap a batch
    quiet = engine is None or (exported and backend != "auto")
    predictor = build() if quiet else engine.between_batches(build)
    lap("build")
    metrics.MODEL_BUILD_SECONDS.observe(took["build"])
    smoke_check(predictor, settings.smoke_samples_dir, settings.smoke_min_accuracy)
    lap("smoke_check")
    return predictor


def record_shadow(connection, settings: Settings, verdicts: list[ShadowVerdict]) -> None:
    """Add a batch's champion/challenger verdicts to the challenger's counts, each frame once."""
    pairs: dict[tuple[str, str], list[ShadowVerdict]] = {}
    for v in verdicts:
        pairs.setdefault((v.challenger_sha256, v.champion_sha256), []).append(v)
    for pair, group in pairs.items():
        args = [x for v in group for x in (v.job_id, v.champion, v.challenger, v.line_id)]
        connection.eval(RECORD_SHADOW, 3, settings.shadow_stats_key(*pair), settings.shadow_seen_key(*pair),
                        settings.shadow_disagree_stream(*pair), SHADOW_DISAGREE_MAXLEN, SHADOW_TTL_S, *args)
        for v in group:
            metrics.SHADOW_FRAMES.labels(agree=str(v.agree).lower()).inc()


class ModelWatcher:
    """Follows the live and shadow pointers for one worker's engine (a daemon thread; :meth:`poll` does one round)."""

    def __init__(self, settings: Settings, engine: FrameEngine, registry: ModelRegistry, worker: str):
        self.settings, self.engine, self.registry, self.worker = settings, engine, registry, worker
        # sha256 -> why; not tried again until the live pointer moves to another model (a re-push may mend it)
        self.refused: dict[str, str] = {}
        self.refused_last: str | None = None
        self.retry_at: dict[str, tuple[float, float]] = {}  # sha256 -> (next try, pause) after a transient error
        self.last_live: str | None = None
        self.loaded: OrderedDict[str, Predictor] = OrderedDict()  # recently served, for instant rollback
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ModelWatcher:
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.model_poll_s):
            try:
                self.poll()
            except REDIS_TRANSIENT as exc:  # the work loop rides Redis outages out; so does the watcher
                log.warning("model watcher: Redis unavailable (%s); trying again", exc)
            except Exception:
                log.exception("model watcher round failed; trying again")

    def poll(self) -> None:
        """One round: stage a new live model, start or stop a shadow, report what this worker serves."""
        live = self.registry.live()
        if live != self.last_live:  # a new decision: models refused before may have been mended since
            self.refused.clear()
            self.last_live = live
        staged = self.engine.staged_sha256
        if staged is not None and live and staged != live:  # a rollback (or promotion) overtook a staged model
            self.engine.unstage()
        self.engine.switch_if_idle()  # a model staged while a batch ran, and no batch since
        if (live and live not in (self.engine.serving_sha256, self.engine.staged_sha256) and live not in self.refused
                and self._due(live)):
            predictor = self._obtain(live, "live")
            if predictor is not None:
                self._keep(self.engine.predictor)
                self.engine.stage(predictor)
        shadow = self.registry.shadowing()
        if shadow is None:
            if self.engine.shadow_sha256 is not None:
                self.engine.set_shadow(None)
                log.info("shadow model off")
        else:
            sha, share = shadow
            current = self.engine.shadow
            if current is not None and current.predictor.checkpoint.sha256 == sha:
                if current.share != share:
                    self.engine.set_shadow(Shadow(current.predictor, share))
            elif sha not in self.refused and self._due(sha):
                predictor = self._obtain(sha, "shadow")
                if predictor is not None:
                    self.engine.set_shadow(Shadow(predictor, share))
                    log.info("shadow model %s… on %.0f%% of frames", sha[:12], 100 * share)
        self.report()

    def _due(self, sha: str) -> bool:
        """False while a model that failed for a passing reason waits for its next try."""
        return time.monotonic() >= self.retry_at.get(sha, (0.0, 0.0))[0]

    def _keep(self, predictor: Predictor) -> None:
        self.loaded[predictor.checkpoint.sha256] = predictor
        self.loaded.move_to_end(predictor.checkpoint.sha256)
        while len(self.loaded) > KEEP_LOADED:
            self.loaded.popitem(last=False)

    def _obtain(self, sha: str, role: str) -> Predictor | None:
        """The checkpoint fetched, loaded and smoke-checked; None when refused (or the store is out: next round)."""
        if sha in self.loaded:
            return self.loaded.pop(sha)
        shadow = self.engine.shadow
        if shadow is not None and shadow.predictor.checkpoint.sha256 == sha:  # shadowed first: promoted at once
            return shadow.predictor
        started = time.perf_counter()
        took: dict[str, float] = {}
        try:
            path = self.registry.fetch(sha, self.settings.model_cache_dir)
            took["fetch"] = time.perf_counter() - started
            predictor = load_checked(path, self.settings, self.engine, took)
            self.engine.tiling.size(predictor.input_size)  # a tiling this model cannot serve: refused, not retried
        except Exception as exc:
            if passing(exc):
                pause = min(2 * self.retry_at.get(sha, (0.0, 0.5))[1], RETRY_MAX_S)
                self.retry_at[sha] = (time.monotonic() + pause, pause)
                log.warning("could not load model %s… yet (%s: %s); trying again in %.0f s", sha[:12],
                            type(exc).__name__, exc, pause)
                return None
            self.refused[sha] = f"{type(exc).__name__}: {exc}"[:500]
            self.refused_last = sha
            metrics.MODEL_REFUSED.labels(role=role).inc()
            log.error("refusing %s model %s…, keeping %s…: %s", role, sha[:12], self.engine.serving_sha256[:12],
                      self.refused[sha])
            self.report()
            return None
        self.retry_at.pop(sha, None)
        metrics.MODEL_LOAD_SECONDS.observe(time.perf_counter() - started)
        log.info("%s model %s… loaded and smoke-checked in %.1fs (%s)", role, sha[:12], time.perf_counter() - started,
                 ", ".join(f"{step} {s:.2f}s" for step, s in took.items()))
        return predictor

    def state(self) -> WorkerModelState:
        refused = self.refused_last if self.refused_last in self.refused else None
        return WorkerModelState(
            worker=self.worker, sha256=self.engine.serving_sha256, shadow_sha256=self.engine.shadow_sha256,
            refused_sha256=refused, refused_reason=self.refused.get(refused) if refused else None,
            switched_at=self.engine.switched_at, at=datetime.now(UTC))

    def report(self) -> None:
        key = self.settings.model_workers_key
        with self.registry.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, self.worker, self.state().model_dump_json())
            pipe.expire(key, STATE_TTL_S)
            pipe.execute()

    def forget(self) -> None:
        """Take this worker's report off the dashboard (a clean stop)."""
        self.registry.redis.hdel(self.settings.model_workers_key, self.worker)


def passing(exc: BaseException) -> bool:
    """An error worth another try later (the store or Redis out, no memory or disk for now), not the model's."""
    return s3_transient(exc) or isinstance(exc, (*REDIS_TRANSIENT, MemoryError)) or (
        isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))


START_TRIES = 5  # a store out at start is waited for, with doubling pauses from 1 s


def initial_predictor(settings: Settings, registry: ModelRegistry) -> Predictor | None:
    """At start, the newest model of the registry's live one and its history that loads and passes its smoke
    check, so a restarted worker serves what its peers serve, even when the live model is one they refused.
    None when no model is live (``settings.checkpoint`` is served). The watcher's first round refuses a live
    model that failed here, visibly."""
    for sha in [registry.live(), *registry.history()]:
        if not sha:
            continue
        for attempt in range(START_TRIES):
            try:
                return load_checked(registry.fetch(sha, settings.model_cache_dir), settings)
            except Exception as exc:
                if passing(exc) and attempt < START_TRIES - 1:
                    log.warning("model %s… not loaded yet (%s); trying again", sha[:12], exc)
                    time.sleep(2**attempt)
                    continue
                log.error("cannot serve model %s… at start: %s", sha[:12], exc)
                break
    if registry.live():
        log.error("no registered model loads; starting on %s", settings.checkpoint or "the shipped checkpoint")
    return None
