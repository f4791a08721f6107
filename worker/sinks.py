"""Event sinks: each finished frame (or each one with a chosen verdict) pushed to a webhook and/or an MQTT broker.

The worker never talks to a sink while it publishes. The same Redis script that writes
a frame's result appends it to an outbox stream per configured sink
(``<prefix>:sink:<name>``, :func:`outbox_keys`), so an event exists exactly when its
result does, and survives a worker restart. A :class:`SinkRunner` thread in each worker
process drains each outbox through a Redis consumer group, so every event goes to one
worker's runner, and a runner that dies leaves its events to the others
(:data:`CLAIM_IDLE_S`): a live runner renews its claim before each attempt and never
takes back an event another runner took over.

Policy, stated once (docs/alerts.md):

- an event is retried with backoff (0.5 s doubling to ``sink_retry_max_s``) until the
  sink takes it; the events this runner holds behind it wait, in order;
- one the sink refuses for good (an HTTP 4xx other than 408/429, or a redirect), or still
  not taken ``sink_retry_window_s`` after its first attempt, moves to the dead-letter
  stream ``<prefix>:sink:<name>:dead``, which keeps the newest ``sink_queue_max`` (older
  ones trimmed, counted in ``<prefix>:sink:<name>:dead:trimmed``);
- while ``sink_queue_max`` events wait for a sink, newer ones for it are dropped, and
  counted in ``<prefix>:sink:<name>:dropped`` (metric ``steelsight_sink_dropped``).

Delivery is at least once: every event carries its id (the job id), which a receiver
uses to ignore a repeat (after a worker died between the sink taking an event and
the acknowledgement, say).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from prometheus_client import Counter, Gauge

from steelsight.clients import REDIS_TRANSIENT, redis_client
from steelsight.contract import REJECTED, SINK_CLAIM_IDLE_S, FrameResult, Settings

log = logging.getLogger("steelsight.sinks")

GROUP = "steelsight-sinks"
CLAIM_IDLE_S = SINK_CLAIM_IDLE_S  # an event held this long by a runner that stopped refreshing its claim is taken over
READ_COUNT = 32
FIRST_BACKOFF_S = 0.5
OBSERVE_EVERY_S = 2.0  # the gauges' refresh while a runner retries one event (scrapes come every few seconds)
SIGNATURE_HEADER = "X-Steelsight-Signature"
TIMESTAMP_HEADER = "X-Steelsight-Timestamp"
EVENT_ID_HEADER = "X-Steelsight-Event-Id"
MQTT_CONNECT_TIMEOUT_S = 10.0
MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

EVENTS = Counter("steelsight_sink_events_total", "Events handed to a sink, by sink and outcome "
                 "(delivered, dead_letter)", ["sink", "outcome"])
ATTEMPT_FAILURES = Counter("steelsight_sink_failed_attempts_total", "Delivery attempts a sink did not take",
                           ["sink"])
WAITING = Gauge("steelsight_sink_waiting", "Events waiting in a sink's outbox (all workers), as last seen",
                ["sink"])
DROPPED = Gauge("steelsight_sink_dropped", "Events dropped because a sink's outbox was full (all workers, ever)",
                ["sink"])
DEAD = Gauge("steelsight_sink_dead_letters", "Events in a sink's dead-letter stream (all workers), as last seen",
             ["sink"])
DEAD_TRIMMED = Gauge("steelsight_sink_dead_letters_trimmed",
                     "Dead letters trimmed from a full dead-letter stream (all workers, ever)", ["sink"])


class SinkConfigError(ValueError):
    """A sink the worker cannot start with (bad verdict list, a broker refusing the login): a start-up error."""


class Transient(Exception):
    """The sink did not take the event this time; it is retried."""


class Permanent(Exception):
    """The sink refused the event for good; it goes to the dead-letter stream."""


def sink_names(settings: Settings) -> list[str]:
    return settings.event_sinks()


def outbox_key(settings: Settings, sink: str) -> str:
    return f"{settings.key_prefix}:sink:{sink}"


def wanted_verdicts(settings: Settings) -> frozenset[str] | None:
    """The verdicts pushed to the sinks; None: all of them."""
    return _verdicts(settings.sink_verdicts)


@lru_cache(maxsize=8)
def _verdicts(setting: str) -> frozenset[str] | None:
    text = setting.strip()
    if text == "all":
        return None
    from steelsight.model.inference.labels import CLASSES
    from steelsight.model.inference.tiling import BACKGROUND, UNKNOWN

    wanted = frozenset(v.strip() for v in text.split(",") if v.strip())
    known = {*CLASSES, BACKGROUND, UNKNOWN, REJECTED}
    if not wanted or wanted - known:
        raise SinkConfigError(f"sink_verdicts {setting!r}: say `all` or a comma list of "
                              f"{', '.join(sorted(known))}")
    return wanted


def outbox_keys(settings: Settings, result: FrameResult) -> list[str]:
    """(outbox, dropped counter) per sink that takes this result's event: the publish script's extra keys."""
    names = sink_names(settings)
    if not names:
        return []
    wanted = wanted_verdicts(settings)
    if wanted is not None and result.verdict not in wanted:
        return []
    return [key for name in names for key in (outbox_key(settings, name), f"{outbox_key(settings, name)}:dropped")]


def event_body(result_json: bytes) -> tuple[str, dict]:
    """(event id, the JSON document a sink receives) for a stored result."""
    result = FrameResult.model_validate_json(result_json)
    return result.job_id, {"id": result.job_id, "verdict": result.verdict, "line_id": result.line_id,
                           "camera_id": result.camera_id, "result": json.loads(result_json)}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The webhook signature: HMAC-SHA256 of ``<timestamp>.<body>``, as ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


# --- the sinks ---------------------------------------------------------------------------------------------------

class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302/303 with a GET without the body, and the event would count as delivered."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx is then raised as an HTTPError


class WebhookSink:
    name = "webhook"

    def __init__(self, settings: Settings):
        self.url, self.timeout = settings.webhook_url, settings.webhook_timeout_s
        self.secret = settings.webhook_secret.get_secret_value().encode()
        self.opener = urllib.request.build_opener(_RefuseRedirects)

    def deliver(self, event_id: str, event: dict) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", EVENT_ID_HEADER: event_id, TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body), "User-Agent": "steelsight-webhook"})
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise Permanent(f"HTTP {exc.code} {exc.reason}: the webhook redirects to "
                                f"{exc.headers.get('Location')!r}; set STEELSIGHT_WEBHOOK_URL to the final URL "
                                "(a redirected POST would lose its body)") from exc
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise Permanent(f"HTTP {exc.code} {exc.reason}") from exc
            raise Transient(f"HTTP {exc.code} {exc.reason}") from exc
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            # refused, reset, timed out, DNS; a garbled status line or a body cut short
            raise Transient(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @staticmethod
    def parse(url: str) -> Broker:
        parts = urlsplit(url)
        return Broker(parts.hostname, parts.port or MQTT_DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts",
                      unquote(parts.username) if parts.username else None,
                      unquote(parts.password) if parts.password else None)


class MqttSink:
    """QoS 1 publishes through paho's network thread; an event counts as taken once the broker's PUBACK is in."""

    name = "mqtt"

    def __init__(self, settings: Settings, client_id: str):
        import paho.mqtt.client as mqtt

        self.broker = Broker.parse(settings.mqtt_url.get_secret_value())
        self.topic, self.timeout = settings.mqtt_topic.rstrip("/"), settings.webhook_timeout_s
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if self.broker.username is not None:
            self.client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            self.client.tls_set_context(ssl.create_default_context())
        self.client.reconnect_delay_set(1, 30)
        self._answered = threading.Event()
        self._refusal: str | None = None
        self.client.on_connect = self._on_connect

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self._refusal = None if not reason_code.is_failure else str(reason_code)
        self._answered.set()

    def start(self) -> None:
        """Connect; a broker refusing the login is a :class:`SinkConfigError`, one not reachable yet is retried."""
        where = f"MQTT broker {self.broker.host}:{self.broker.port}"
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            log.warning("%s not reachable (%s): events wait in Redis until it is", where, exc)
            self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
            self.client.loop_start()
            return
        self.client.loop_start()
        if self._answered.wait(MQTT_CONNECT_TIMEOUT_S) and self._refusal:
            self.close()
            raise SinkConfigError(f"{where} refused the login ({self._refusal}): check the user and password "
                                  "in STEELSIGHT_MQTT_URL")

    def topic_for(self, event: dict) -> str:
        return f"{self.topic}/{event['line_id']}/{event['camera_id']}/{event['verdict']}"

    def deliver(self, event_id: str, event: dict) -> None:
        if not self.client.is_connected():
            raise Transient("not connected to the broker")
        info = self.client.publish(self.topic_for(event), json.dumps(event, separators=(",", ":")), qos=1)
        if info.rc != 0:
            raise Transient(f"publish failed (rc {info.rc})")
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise Transient(str(exc)) from exc
        if not info.is_published():
            raise Transient(f"no PUBACK within {self.timeout:g}s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- draining an outbox ------------------------------------------------------------------------------------------

# Renew this runner's claim on the events it holds (their idle time back to 0), except those another runner
# took over meanwhile: XCLAIM alone would take them back, and both runners would send them.
# KEYS[1]: outbox; ARGV: group, consumer, entry ids. Returns the ids still held.
REFRESH_CLAIMS = """
local held = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held[#held + 1] = ARGV[i]
  end
end
return held
"""

# Move an event to the dead-letter stream, keep its newest ARGV[4] entries and count those trimmed, in one step.
# KEYS: outbox, dead-letter stream, trimmed counter; ARGV: result, error, attempts, max length, group, entry id.
DEAD_LETTER = """
redis.call('XADD', KEYS[2], '*', 'result', ARGV[1], 'error', ARGV[2], 'attempts', ARGV[3])
local trimmed = redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[4])
if trimmed > 0 then
  redis.call('INCRBY', KEYS[3], trimmed)
end
redis.call('XACK', KEYS[1], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[1], ARGV[6])
return trimmed
"""


class SinkRunner:
    """Drains one sink's outbox on a daemon thread; never raises into the worker."""

    def __init__(self, settings: Settings, sink, consumer: str, connection=None):
        self.settings, self.sink, self.consumer = settings, sink, consumer
        self.connection = connection or redis_client(settings)
        self.key = outbox_key(settings, sink.name)
        self.dead_key, self.dropped_key = f"{self.key}:dead", f"{self.key}:dropped"
        self.trimmed_key = f"{self.dead_key}:trimmed"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        self._held: list[bytes] = []
        self._claim_cursor = "0-0"  # where XAUTOCLAIM's scan of the pending entries goes on
        self._own_first = True  # read this consumer's own pending events (a batch cut short) before new ones
        self._observed_at = 0.0
        self._refresh = self.connection.register_script(REFRESH_CLAIMS)
        self._to_dead = self.connection.register_script(DEAD_LETTER)

    def start(self) -> SinkRunner:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.thread.join(timeout)
        self.sink.close()
        if not self.thread.is_alive():
            self._leave_group()

    def _leave_group(self) -> None:
        """Delete this runner's consumer name (each worker start has its own), unless it still holds events:
        deleting it would drop them from the group's pending list, and no runner would send them."""
        with contextlib.suppress(Exception):  # Redis gone at exit: the name stays behind, harmless
            if not self.connection.xpending_range(self.key, GROUP, "-", "+", 1, consumername=self.consumer):
                self.connection.xgroup_delconsumer(self.key, GROUP, self.consumer)

    def _run(self) -> None:
        pause = FIRST_BACKOFF_S
        while not self.stopping.is_set():
            try:
                self._ensure_group()
                while not self.stopping.is_set():
                    self._drain_once()
                    pause = FIRST_BACKOFF_S
            except REDIS_TRANSIENT as exc:
                log.warning("sink %s: Redis unavailable (%s); retrying in %.1fs", self.sink.name, exc, pause)
            except Exception:  # a bug must not kill the thread: events wait in Redis meanwhile
                log.exception("sink %s: unexpected error; retrying in %.1fs", self.sink.name, pause)
            self._own_first = True  # the batch cut short is still this consumer's: pick it up first
            self.stopping.wait(pause)
            pause = min(pause * 2, self.settings.sink_retry_max_s)

    def _ensure_group(self) -> None:
        import redis

        try:  # from the start of the outbox: events written before any runner existed are delivered too
            self.connection.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _drain_once(self) -> None:
        entries = []
        if self._own_first:
            read = self.connection.xreadgroup(GROUP, self.consumer, {self.key: "0"}, count=READ_COUNT)
            entries = read[0][1] if read else []  # one deleted meanwhile comes without fields: acknowledged
            self._own_first = bool(entries)
        if not entries:
            # a runner that stopped refreshing its claims (its worker died) leaves its events to this one
            self._claim_cursor, claimed, _ = self.connection.xautoclaim(
                self.key, GROUP, self.consumer, int(CLAIM_IDLE_S * 1000), self._claim_cursor, count=READ_COUNT)
            entries = list(claimed)
        if not entries:
            read = self.connection.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=READ_COUNT, block=1000)
            entries = read[0][1] if read else []
        self._held = [entry_id for entry_id, _ in entries]
        for entry_id, fields in entries:
            if self.stopping.is_set():
                return  # unacknowledged: another runner (or this worker's next start) takes them over
            self._handle(entry_id, fields)
            if entry_id in self._held:  # not if another runner took it over
                self._held.remove(entry_id)
        self._observe()

    def _handle(self, entry_id: bytes, fields: dict | None) -> None:
        if not fields or b"result" not in fields:  # deleted meanwhile: nothing left to send
            self._ack(entry_id)
            return
        try:
            event_id, event = event_body(fields[b"result"])
        except ValueError as exc:
            self._dead_letter(entry_id, fields, f"unreadable result: {exc}", 0)
            return
        first, pause, attempts = time.monotonic(), FIRST_BACKOFF_S, 0
        while True:
            if entry_id not in self._refresh_claims():
                log.warning("sink %s: event %s was taken over by another worker's runner (this one stalled "
                            "for %.0f s); leaving it to that one", self.sink.name, event_id, CLAIM_IDLE_S)
                return
            attempts += 1
            try:
                self.sink.deliver(event_id, event)
            except Permanent as exc:
                self._dead_letter(entry_id, fields, str(exc), attempts)
                return
            except Exception as exc:  # Transient, or anything else a sink raises: retried, on the same schedule
                ATTEMPT_FAILURES.labels(sink=self.sink.name).inc()
                why = str(exc) if isinstance(exc, Transient) else f"{type(exc).__name__}: {exc}"
                if time.monotonic() - first + pause > self.settings.sink_retry_window_s:
                    self._dead_letter(entry_id, fields, f"not taken within the retry window: {why}", attempts)
                    return
                if attempts == 1 or attempts % 10 == 0:
                    log.warning("sink %s: event %s not taken (%s); retrying", self.sink.name, event_id, why,
                                exc_info=not isinstance(exc, Transient))
                if self.stopping.wait(pause):
                    return
                pause = min(pause * 2, self.settings.sink_retry_max_s)
                if time.monotonic() - self._observed_at >= OBSERVE_EVERY_S:
                    self._observe()  # the backlog grows meanwhile: EventSinkBacklog and EventsDropped read it
                continue
            self._ack(entry_id)
            EVENTS.labels(sink=self.sink.name, outcome="delivered").inc()
            return

    def _refresh_claims(self) -> list[bytes]:
        """Reset the idle time of the events this runner still holds, so no other runner takes them over;
        returns those ids (one another runner took over is no longer this runner's)."""
        if not self._held:
            return []
        held = self._refresh(keys=[self.key], args=[GROUP, self.consumer, *self._held])
        self._held = [entry_id for entry_id in self._held if entry_id in held]
        return list(self._held)

    def _ack(self, entry_id: bytes) -> None:
        # acknowledged events leave the outbox: its length is what still waits (sink_queue_max bounds it)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, GROUP, entry_id)
            pipe.xdel(self.key, entry_id)
            pipe.execute()

    def _dead_letter(self, entry_id: bytes, fields: dict, error: str, attempts: int) -> None:
        log.error("sink %s: event %s moved to %s after %d attempt(s): %s", self.sink.name,
                  entry_id.decode(), self.dead_key, attempts, error)
        trimmed = self._to_dead(keys=[self.key, self.dead_key, self.trimmed_key],
                                args=[fields[b"result"], error[:500], attempts, self.settings.sink_queue_max, GROUP,
                                      entry_id])
        if trimmed:
            log.warning("sink %s: dead-letter stream full (%d): its oldest %d dropped", self.sink.name,
                        self.settings.sink_queue_max, trimmed)
        EVENTS.labels(sink=self.sink.name, outcome="dead_letter").inc()

    def _observe(self) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.xlen(self.key)
            pipe.get(self.dropped_key)
            pipe.xlen(self.dead_key)
            pipe.get(self.trimmed_key)
            waiting, dropped, dead, trimmed = pipe.execute()
        WAITING.labels(sink=self.sink.name).set(waiting)
        DROPPED.labels(sink=self.sink.name).set(int(dropped or 0))
        DEAD.labels(sink=self.sink.name).set(dead)
        DEAD_TRIMMED.labels(sink=self.sink.name).set(int(trimmed or 0))
        self._observed_at = time.monotonic()


def start_sinks(settings: Settings, consumer: str) -> list[SinkRunner]:
    """A runner per configured sink; raises :class:`SinkConfigError` for a sink the worker cannot start with."""
    wanted_verdicts(settings)  # a bad list stops the worker now, not on its first result
    runners = []
    for name in sink_names(settings):
        sink = WebhookSink(settings) if name == "webhook" else MqttSink(settings, f"steelsight-{consumer}")
        if name == "mqtt":
            sink.start()
        runners.append(SinkRunner(settings, sink, consumer).start())
        log.info("events to the %s sink (%s)", name, settings.sink_verdicts)
    return runners
