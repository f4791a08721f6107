"""Real servers for integration tests: one SeaweedFS per run, a redis-server per module, settings per test;
mosquitto on loopback for the tests that ask for it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from steelsight.contract import Settings
from steelsight.devstack import ServiceExited, free_port, mosquitto_server, redis_server, s3_server

from ..conftest import random_checkpoint

_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """SeaweedFS's S3 gateway on loopback, one per test run, over a fresh data folder."""
    for attempt in range(3):  # a port found free may be taken by another process before weed binds it
        try:
            s3 = s3_server(tmp_path_factory.mktemp("seaweedfs")).start()
            break
        except ServiceExited:
            if attempt == 2:
                raise
    yield s3
    s3.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory, s3_service):
    """A real redis-server per test module, beside the run's SeaweedFS; tests use buckets of their own."""
    redis = redis_server(tmp_path_factory.mktemp("services")).start()
    yield redis, s3_service
    redis.stop()


MQTT_USERS = {"steelsight": "mqtt-pw"}


@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory):
    """Debian's mosquitto on a free loopback port; anonymous clients refused, one user (MQTT_USERS)."""
    broker = mosquitto_server(tmp_path_factory.mktemp("mosquitto"), users=MQTT_USERS).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def pipeline_checkpoint(tmp_path_factory) -> Path:
    """96 px: a batch takes long enough for a worker to be killed in the middle of it."""
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), 96)


@pytest.fixture()
def settings(services, pipeline_checkpoint) -> Settings:
    """Fresh queue, key prefix and buckets per test; short timeouts so recovery is quick."""
    redis, s3 = services
    n = next(_ids)
    return Settings(
        redis_url=f"redis://127.0.0.1:{redis.port}/0", s3_endpoint=f"127.0.0.1:{s3.port}",
        s3_access_key=s3.credentials.access_key, s3_secret_key=s3.credentials.secret_key,
        queue_name=f"frames-{n}", key_prefix=f"t{n}",
        frames_bucket=f"frames-{n}", overlays_bucket=f"overlays-{n}", library_bucket=f"library-{n}",
        checkpoint=str(pipeline_checkpoint),
        device="cpu", batch_size=4, job_timeout_s=10, maintenance_interval_s=1,
        metrics_port=free_port(), dashboard_port=free_port(), dashboard_metrics_port=free_port(),
        dashboard_refresh_s=1.0,
    )
