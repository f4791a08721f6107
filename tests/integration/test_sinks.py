"""Event sinks against real servers: a webhook receiver that goes down mid-stream, and mosquitto on loopback.

Results are published through the worker's own publish path (``jobs.publish_many``),
which writes each sink's outbox in the same Redis script as the result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from prometheus_client import REGISTRY

from steelsight.contract import FrameResult, Settings, Timings
from steelsight.devstack import free_port, wait_until
from steelsight.worker import jobs, sinks

from .conftest import MQTT_USERS

SECRET = "webhook-test-secret"


def result(i: int, line: str = "line-1", camera: str = "cam-1", label: str = "scratches", **fields) -> FrameResult:
    now = datetime.now(UTC)
    return FrameResult(frame_id=f"f{i}", job_id=f"{line}__{camera}__f{i}", line_id=line, camera_id=camera,
                       captured_at=now, status="ok", label=label, confidence=0.9, frame_key=f"{line}/f{i}.png",
                       timings=Timings(queue_wait_s=0, inference_s=0, total_s=0), **fields)


class Receiver:
    """A webhook receiver on a fixed port that can be taken down and brought back; records each event by id."""

    def __init__(self, port: int):
        self.port, self.seen, self.bad_signatures = port, [], 0
        self.server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp, signature = self.headers[sinks.TIMESTAMP_HEADER], self.headers[sinks.SIGNATURE_HEADER]
                expected = "sha256=" + hmac.new(SECRET.encode(), f"{stamp}.".encode() + body,
                                                hashlib.sha256).hexdigest()
                if not hmac.compare_digest(expected, signature):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                event = json.loads(body)
                assert event["id"] == self.headers[sinks.EVENT_ID_HEADER] == event["result"]["job_id"]
                receiver.seen.append(event["id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # the port refuses connections until up() again


def waiting(sink: str) -> float:
    return REGISTRY.get_sample_value("steelsight_sink_waiting", {"sink": sink}) or 0.0


def with_sinks(settings: Settings, **updates) -> Settings:
    """``settings`` with ``updates``, validated as the worker validates them at start."""
    return Settings.model_validate(settings.model_dump() | updates)


@pytest.fixture()
def sink_settings(settings: Settings) -> Settings:
    return with_sinks(settings, sink_retry_max_s=1.0)


def test_a_webhook_receiver_down_10s_mid_stream_gets_every_event_exactly_once(sink_settings, services):
    port = free_port()
    s = with_sinks(sink_settings, **{"webhook_url": f"http://127.0.0.1:{port}/events",
                                         "webhook_secret": SECRET})
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    receiver = Receiver(port)
    receiver.up()
    runner = sinks.SinkRunner(s, sinks.WebhookSink(s), "test-worker").start()
    try:
        sent, slowest = [], 0.0

        def publish(i: int) -> None:
            nonlocal slowest
            r = result(i)
            started = time.perf_counter()
            assert jobs.publish_many([r], conn, s) == [True]
            slowest = max(slowest, time.perf_counter() - started)
            sent.append(r.job_id)

        for i in range(10):
            publish(i)
        wait_until(lambda: len(receiver.seen) == 10, 10, "the first 10 events")
        receiver.down()
        outage = time.monotonic()
        i = 10
        while time.monotonic() - outage < 10:  # the stream goes on while the receiver is down
            publish(i)
            i += 1
            time.sleep(0.25)
        during = len(receiver.seen)
        # the runner is stuck retrying one event, yet its gauge follows the outbox (EventSinkBacklog reads it)
        backlog = len(sent) - during
        wait_until(lambda: waiting("webhook") >= backlog, 5, f"steelsight_sink_waiting to reach {backlog}")
        receiver.up()
        for j in range(i, i + 10):
            publish(j)
        wait_until(lambda: len(receiver.seen) >= len(sent), 15, "every event after the outage")
        time.sleep(1.0)  # any duplicate would arrive now
    finally:
        runner.stop()
        receiver.down()
    assert during == 10, "nothing can arrive while the receiver is down"
    assert sorted(receiver.seen) == sorted(sent), "every event exactly once"
    assert len(set(receiver.seen)) == len(receiver.seen) == len(sent) > 50
    assert receiver.bad_signatures == 0
    assert slowest < 0.5, f"publishing waited on the sink ({slowest:.2f}s)"
    key = sinks.outbox_key(s, "webhook")
    assert conn.xlen(key) == 0 and conn.xlen(f"{key}:dead") == 0
    assert conn.xinfo_consumers(key, sinks.GROUP) == [], "a cleanly stopped runner leaves no consumer behind"


def test_a_full_outbox_drops_newer_events_and_counts_them(sink_settings, services):
    s = with_sinks(sink_settings, **{"webhook_url": "http://127.0.0.1:9/none", "webhook_secret": SECRET,
                                         "sink_queue_max": 5, "sink_verdicts": "scratches,unknown"})
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    jobs.publish_many([result(i) for i in range(8)] + [result(99, label="crazing")], conn, s)
    key = sinks.outbox_key(s, "webhook")
    assert conn.xlen(key) == 5  # the first five wait; crazing is not a verdict the sinks take
    assert int(conn.get(f"{key}:dropped")) == 3
    waiting = [json.loads(f[b"result"])["job_id"] for _, f in conn.xrange(key)]
    assert waiting == [result(i).job_id for i in range(5)]


def test_a_refused_event_goes_to_the_dead_letter_stream(sink_settings, services):
    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(400)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s = with_sinks(sink_settings, **{"webhook_url": f"http://127.0.0.1:{server.server_port}/",
                                         "webhook_secret": SECRET})
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    runner = sinks.SinkRunner(s, sinks.WebhookSink(s), "test-worker").start()
    try:
        jobs.publish_many([result(1)], conn, s)
        dead = f"{sinks.outbox_key(s, 'webhook')}:dead"
        wait_until(lambda: conn.xlen(dead) == 1, 10, "the dead letter")
    finally:
        runner.stop()
        server.shutdown()
    (_, fields), = conn.xrange(dead)
    assert b"HTTP 400" in fields[b"error"] and json.loads(fields[b"result"])["job_id"] == result(1).job_id


def test_dead_letters_past_the_limit_are_trimmed_and_counted(sink_settings, services):
    s = with_sinks(sink_settings, webhook_url="http://127.0.0.1:9/none", webhook_secret=SECRET, sink_queue_max=2)
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    runner = sinks.SinkRunner(s, sinks.WebhookSink(s), "test-worker")
    runner._ensure_group()
    for i in range(5):  # refused for good, one after the other
        jobs.publish_many([result(i)], conn, s)
        (entry_id, fields), = conn.xrange(runner.key)
        runner._dead_letter(entry_id, fields, "HTTP 400 Bad Request", 1)
    runner._observe()
    assert conn.xlen(runner.dead_key) == 2
    assert int(conn.get(f"{runner.dead_key}:trimmed")) == 3
    assert REGISTRY.get_sample_value("steelsight_sink_dead_letters_trimmed", {"sink": "webhook"}) == 3


class RawReceiver:
    """A webhook receiver on a raw socket: answers the n-th request with ``answers[n]`` (bytes), the last one after."""

    def __init__(self, *answers: bytes):
        self.answers, self.requests = answers, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with client:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += client.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"POST" in head[:5] else 0
                while len(body) < length:
                    body += client.recv(65536)
                self.requests.append(head.split(b"\r\n", 1)[0].decode())
                client.sendall(self.answers[min(len(self.requests), len(self.answers)) - 1])

    def close(self) -> None:
        self.server.close()


OK = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("garbled", [
    b"garbage\r\n\r\n",  # http.client.BadStatusLine
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"partial",  # IncompleteRead
], ids=["bad-status-line", "incomplete-read"])
def test_a_garbled_answer_is_retried_on_schedule(sink_settings, services, garbled):
    receiver = RawReceiver(garbled, garbled, OK)
    s = with_sinks(sink_settings, webhook_url=f"http://127.0.0.1:{receiver.port}/events", webhook_secret=SECRET)
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    failed = REGISTRY.get_sample_value("steelsight_sink_failed_attempts_total", {"sink": "webhook"}) or 0
    runner = sinks.SinkRunner(s, sinks.WebhookSink(s), "test-worker").start()
    try:
        jobs.publish_many([result(1)], conn, s)
        wait_until(lambda: conn.xlen(runner.key) == 0, 8, "the event taken on the third attempt")
    finally:
        runner.stop()
        receiver.close()
    assert len(receiver.requests) == 3 and conn.xlen(runner.dead_key) == 0
    assert REGISTRY.get_sample_value("steelsight_sink_failed_attempts_total", {"sink": "webhook"}) == failed + 2


def test_a_redirect_is_refused_not_followed(sink_settings, services):
    receiver = RawReceiver(b"HTTP/1.1 301 Moved Permanently\r\nLocation: /v2/events\r\nContent-Length: 0\r\n"
                           b"Connection: close\r\n\r\n", OK)
    s = with_sinks(sink_settings, webhook_url=f"http://127.0.0.1:{receiver.port}/events", webhook_secret=SECRET)
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    runner = sinks.SinkRunner(s, sinks.WebhookSink(s), "test-worker").start()
    try:
        jobs.publish_many([result(1)], conn, s)
        wait_until(lambda: conn.xlen(runner.dead_key) == 1, 8, "the dead letter")
    finally:
        runner.stop()
        receiver.close()
    assert receiver.requests == ["POST /events HTTP/1.1"], "a redirected POST would arrive as a GET without its body"
    (_, fields), = conn.xrange(runner.dead_key)
    assert b"HTTP 301" in fields[b"error"] and b"STEELSIGHT_WEBHOOK_URL" in fields[b"error"], fields[b"error"]


def test_a_slow_sink_gets_each_event_once_from_two_runners(sink_settings, services, monkeypatch):
    """A batch that takes longer than the claim idle time stays with the runner working on it."""
    monkeypatch.setattr(sinks, "CLAIM_IDLE_S", 1.5)  # 60 s in production; each event here takes 0.4 s

    class Slow(Receiver):
        def up(self):
            super().up()
            handler = self.server.RequestHandlerClass
            post = handler.do_POST
            handler.do_POST = lambda h: (time.sleep(0.4), post(h))

    port = free_port()
    s = with_sinks(sink_settings, webhook_url=f"http://127.0.0.1:{port}/events", webhook_secret=SECRET)
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    receiver = Slow(port)
    receiver.up()
    published = [result(i) for i in range(8)]
    jobs.publish_many(published, conn, s)
    runners = [sinks.SinkRunner(s, sinks.WebhookSink(s), name).start() for name in ("worker-a", "worker-b")]
    try:
        wait_until(lambda: conn.xlen(runners[0].key) == 0, 15, "every event taken")
        time.sleep(0.5)  # a duplicate would be on its way now
    finally:
        for runner in runners:
            runner.stop()
        receiver.down()
    assert sorted(receiver.seen) == sorted(r.job_id for r in published), "each event exactly once"


def test_a_runner_does_not_take_back_an_event_another_runner_claimed(sink_settings, services):
    s = with_sinks(sink_settings, webhook_url="http://127.0.0.1:9/none", webhook_secret=SECRET)
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    a = sinks.SinkRunner(s, sinks.WebhookSink(s), "worker-a")
    a._ensure_group()
    jobs.publish_many([result(1), result(2)], conn, s)
    (_, entries), = conn.xreadgroup(sinks.GROUP, "worker-a", {a.key: ">"})
    first, second = a._held = [entry_id for entry_id, _ in entries]
    conn.xclaim(a.key, sinks.GROUP, "worker-b", 0, [first], justid=True)  # a stalled, b took the first over
    assert a._refresh_claims() == [second]
    owners = {p["message_id"]: p["consumer"] for p in conn.xpending_range(a.key, sinks.GROUP, "-", "+", 10)}
    assert owners == {first: b"worker-b", second: b"worker-a"}


def mqtt_url(broker, user="steelsight", password=MQTT_USERS["steelsight"]) -> str:
    return f"mqtt://{user}:{password}@127.0.0.1:{broker.port}"


def test_mqtt_events_arrive_on_their_topic_at_qos_1(sink_settings, services, mqtt_broker):
    import paho.mqtt.client as mqtt

    s = with_sinks(sink_settings, **{"mqtt_url": mqtt_url(mqtt_broker), "mqtt_topic": "plant/steel"})
    received, subscribed = [], threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber")
    client.username_pw_set("steelsight", MQTT_USERS["steelsight"])
    client.on_connect = lambda c, *_: c.subscribe("plant/steel/#", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda c, u, msg: received.append((msg.topic, msg.qos, json.loads(msg.payload)))
    client.connect("127.0.0.1", mqtt_broker.port)
    client.loop_start()
    assert subscribed.wait(10)
    conn = redis.Redis.from_url(s.redis_url.get_secret_value())
    sink = sinks.MqttSink(s, "steelsight-test")
    sink.start()
    runner = sinks.SinkRunner(s, sink, "test-worker").start()
    try:
        published = [result(1), result(2, line="line-2", camera="cam-7", label="crazing"),
                     result(3, unknown=True, unknown_reason="ood_score")]
        jobs.publish_many(published, conn, s)
        wait_until(lambda: len(received) == 3, 10, "three MQTT messages")
    finally:
        runner.stop()
        client.loop_stop()
        client.disconnect()
    by_id = {event["id"]: (topic, qos) for topic, qos, event in received}
    assert by_id == {published[0].job_id: ("plant/steel/line-1/cam-1/scratches", 1),
                     published[1].job_id: ("plant/steel/line-2/cam-7/crazing", 1),
                     published[2].job_id: ("plant/steel/line-1/cam-1/unknown", 1)}


def worker_start_error(env: dict[str, str], monkeypatch, capsys) -> str:
    """``steelsight worker`` with ``env``, in this process; asserts it stops with exit 2, returns its stderr."""
    from steelsight.cli import main
    from steelsight.contract import get_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert main(["worker"]) == 2
    finally:
        get_settings.cache_clear()
    return capsys.readouterr().err


def test_a_broker_refusing_the_login_stops_the_worker_at_start(sink_settings, mqtt_broker, monkeypatch, capsys):
    s = with_sinks(sink_settings, mqtt_url=mqtt_url(mqtt_broker, password="wrong"))
    started = time.monotonic()
    err = worker_start_error(s.to_env(), monkeypatch, capsys)
    assert f"steelsight worker: MQTT broker 127.0.0.1:{mqtt_broker.port} refused the login" in err, err
    assert time.monotonic() - started < 15, "refused before the model loads"


@pytest.mark.parametrize(("env", "says"), [
    ({"STEELSIGHT_WEBHOOK_URL": "ftp://plant/events", "STEELSIGHT_WEBHOOK_SECRET": "x"},
     "webhook_url must be an http:// or https:// URL"),
    ({"STEELSIGHT_WEBHOOK_URL": "https://plant/events"}, "webhook_url needs webhook_secret"),
    ({"STEELSIGHT_MQTT_URL": "tcp://broker:1883"}, "mqtt_url must be mqtt://"),
    ({"STEELSIGHT_SINK_VERDICTS": "scratches,rust"}, "sink_verdicts 'scratches,rust'"),
    ({"STEELSIGHT_WEBHOOK_URL": "https://plant/events", "STEELSIGHT_WEBHOOK_SECRET": "x",
      "STEELSIGHT_SINK_RETRY_MAX_S": "60"}, "sink_retry_max_s + webhook_timeout_s must stay under 30 s"),
])
def test_bad_sink_settings_are_a_clear_start_up_error(env, says, monkeypatch, capsys):
    err = worker_start_error(env, monkeypatch, capsys)
    assert err.startswith("steelsight worker: ") and says in err, err
