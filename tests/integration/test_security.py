"""Security: Redis password + TLS, private buckets, expiring links, fast failure on bad credentials."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from steelsight.cli import main
from steelsight.clients import ObjectStore, redis_client
from steelsight.devstack import Service, free_port, redis_server
from steelsight.producer.service import Producer, replay

from ..helpers import SAMPLES, WorkerProcess, records

PASSWORD = "s3cr3t-for-tests"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with `cryptography` (no openssl binary needed)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "steelsight-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture()
def tls_redis(tmp_path):
    """redis-server speaking only TLS, with a password."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    base = redis_server(tmp_path, port=port)
    args = [*base.args, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
            str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", PASSWORD]
    service = Service(args, port, tmp_path / "redis-tls.log").start()
    yield port, cert
    service.stop()


def test_pipeline_over_tls_redis_with_password(settings, tls_redis, tmp_path):
    port, cert = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    settings = settings.model_copy(update={"redis_url": SecretStr(url)})
    conn = redis_client(settings)
    producer = Producer(settings, "line-tls", "cam-1")
    assert [producer.send_file(i) for i in replay(SAMPLES, limit=3)] == ["enqueued"] * 3
    worker = WorkerProcess(settings, tmp_path, "tls-worker", burst=True)
    worker.proc.wait(timeout=120)
    worker.kill()
    assert len(records(settings, conn)) == 3, worker.output()
    assert PASSWORD not in worker.output()  # the secret is never logged

    # a plain connection, a wrong password and an untrusted certificate are all refused
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=port, socket_timeout=2).ping()
    wrong = settings.model_copy(update={"redis_url": SecretStr(url.replace(PASSWORD, "wrong"))})
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(wrong).ping()
    untrusted = SecretStr(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required")
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        redis_client(settings.model_copy(update={"redis_url": untrusted})).ping()


def test_wrong_password_fails_fast_instead_of_retrying_forever(settings, tls_redis, tmp_path):
    port, cert = tls_redis
    url = f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    worker = WorkerProcess(settings.model_copy(update={"redis_url": SecretStr(url)}), tmp_path, "bad-password")
    assert worker.proc.wait(timeout=60) == 2
    worker.kill()
    assert "Redis or S3 refused the connection for good" in worker.output()


def test_buckets_are_private(settings):
    store = ObjectStore(settings)
    store.ensure_buckets()
    store.put(settings.frames_bucket, "l/c/2026/01/01/f.png", b"frame", "image/png")
    endpoint = f"http://{settings.s3_endpoint}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{endpoint}/{settings.frames_bucket}/l/c/2026/01/01/f.png")  # anonymous
    assert info.value.code == 403
    for bucket in (settings.frames_bucket, settings.overlays_bucket):
        with pytest.raises(Exception, match="NoSuchBucketPolicy"):
            store.client.get_bucket_policy(bucket)


def test_link_command_signs_an_expiring_url(settings, tmp_path, capsys, monkeypatch):
    """The object store honours the link's expiry, and its holder cannot extend it."""
    conn = redis_client(settings)
    producer = Producer(settings, "line-link", "cam-1")
    producer.send_file(next(replay(SAMPLES, limit=1)))
    worker = WorkerProcess(settings, tmp_path, "link-worker", burst=True)
    worker.proc.wait(timeout=120)
    worker.kill(signal.SIGKILL)
    ((job_id, record),) = records(settings, conn).items()
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    from steelsight.contract import get_settings

    get_settings.cache_clear()
    try:
        assert main(["link", job_id, "--expires", "60"]) == 0
        url = capsys.readouterr().out.strip()
        assert main(["link", job_id, "--expires", "2"]) == 0
        short = capsys.readouterr().out.strip()
        assert main(["link", "line-link__cam-1__nope"]) == 2
        assert main(["link", job_id, "--expires", "9999999"]) == 2
    finally:
        get_settings.cache_clear()
    overlay = urllib.request.urlopen(url).read()  # a signed GET works on the private bucket
    assert overlay == ObjectStore(settings).get(settings.overlays_bucket, record["overlay_key"])

    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["X-Amz-Expires"] == "60"
    signed_at = dt.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - signed_at).total_seconds()) < 120
    with pytest.raises(urllib.error.HTTPError) as info:  # a longer expiry needs a new signature
        urllib.request.urlopen(url.replace("X-Amz-Expires=60", "X-Amz-Expires=3600"))
    assert info.value.code == 403
    assert urllib.request.urlopen(short).status == 200
    time.sleep(3)
    with pytest.raises(urllib.error.HTTPError) as info:  # expired
        urllib.request.urlopen(short)
    assert info.value.code == 403


def test_settings_never_print_secrets():
    from steelsight.contract import Settings

    s = Settings(redis_url=f"redis://:{PASSWORD}@h:6379/0", s3_access_key="ak", s3_secret_key=PASSWORD,
                 dashboard_password=PASSWORD)
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    assert json.loads(s.model_dump_json())["s3_secret_key"] == "**********"
