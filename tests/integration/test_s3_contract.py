"""The S3 features steelsight uses, each checked against the object stores it runs on.

SeaweedFS (the local stack and the tests) always; MinIO (compose and Kubernetes) where a
``minio`` binary is on PATH. The README's object-store section lists the same features.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
from minio.error import S3Error
from pydantic import SecretStr

from steelsight.clients import EXPIRY_RULE_ID, MissingObject, ObjectStore, S3AccessDenied, S3CredentialsRejected
from steelsight.contract import Settings
from steelsight.devstack import SeaweedFS, minio_server

from ..faults import HttpFaultProxy

_buckets = iter(range(10**6))


@pytest.fixture(scope="module", params=["seaweedfs", "minio"])
def store_server(request, tmp_path_factory):
    if request.param == "seaweedfs":
        yield request.getfixturevalue("s3_service")
        return
    if shutil.which("minio") is None:
        pytest.skip("no minio binary on PATH")
    server = minio_server(tmp_path_factory.mktemp("minio")).start()
    yield server
    server.stop()


@pytest.fixture()
def store(store_server) -> ObjectStore:
    n = next(_buckets)
    port = store_server.port
    settings = Settings(s3_endpoint=f"127.0.0.1:{port}", s3_public_endpoint=f"localhost:{port}",
                        s3_access_key=store_server.credentials.access_key,
                        s3_secret_key=store_server.credentials.secret_key,
                        frames_bucket=f"contract-frames-{n}", overlays_bucket=f"contract-overlays-{n}",
                        library_bucket=f"contract-library-{n}")
    s = ObjectStore(settings)
    s.ensure_buckets()
    return s


def test_bucket_create_is_idempotent_and_private(store):
    store.ensure_buckets()  # a second service starting finds them
    bucket = store.settings.frames_bucket
    assert store.client.bucket_exists(bucket)
    store.put(bucket, "l/c/f.png", b"frame", "image/png")
    with pytest.raises(urllib.error.HTTPError) as info:  # anonymous
        urllib.request.urlopen(f"http://{store.settings.s3_endpoint}/{bucket}/l/c/f.png")
    assert info.value.code == 403
    with pytest.raises(S3Error, match="NoSuchBucketPolicy"):
        store.client.get_bucket_policy(bucket)


def test_put_get_exists_and_content_type(store):
    bucket, data = store.settings.overlays_bucket, bytes(range(256)) * 400
    store.put(bucket, "a/b/c.jpg", data, "image/jpeg")
    assert store.get(bucket, "a/b/c.jpg") == data
    assert store.get(bucket, "a/b/c.jpg", max_bytes=10) == data[:11]  # over-size reads stop at the limit
    assert store.exists(bucket, "a/b/c.jpg") and not store.exists(bucket, "a/b/none.jpg")
    assert store.client.stat_object(bucket, "a/b/c.jpg").content_type == "image/jpeg"
    with pytest.raises(MissingObject):
        store.get(bucket, "a/b/none.jpg")


def test_user_metadata_round_trips(store):
    bucket = store.settings.frames_bucket
    store.put(bucket, "m.png", b"x", "image/png", metadata={"line": "line-1", "captured-at": "2026-11-29T10:00:00Z"})
    meta = store.client.stat_object(bucket, "m.png").metadata
    assert meta.get("x-amz-meta-line") == "line-1"
    assert meta.get("x-amz-meta-captured-at") == "2026-11-29T10:00:00Z"


def test_presigned_get_on_the_public_host_expires(store):
    bucket = store.settings.frames_bucket
    store.put(bucket, "p.png", b"signed", "image/png")
    url = store.presigned_url(bucket, "p.png")
    assert url.startswith(f"http://{store.settings.s3_public_endpoint}/")
    assert urllib.request.urlopen(url).read() == b"signed"
    short = store.public_client.presigned_get_object(bucket, "p.png", expires=timedelta(seconds=1))
    time.sleep(2.5)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(short)
    assert info.value.code == 403


def test_objects_expire_by_the_setting(store, store_server):
    """MinIO enforces the lifecycle rule every service keeps; SeaweedFS only stores such rules, so the
    stack gives it a TTL on the buckets' path, which it stamps on every object written from then on."""
    bucket = store.settings.frames_bucket
    rules = store.client.get_bucket_lifecycle(bucket).rules
    assert [(r.rule_id, r.expiration.days) for r in rules] == [(EXPIRY_RULE_ID, store.settings.object_expiry)]
    ObjectStore(store.settings.model_copy(update={"object_expiry_days": 30})).ensure_buckets()
    assert [r.expiration.days for r in store.client.get_bucket_lifecycle(bucket).rules] == [30]
    if isinstance(store_server, SeaweedFS):
        library = store.settings.library_bucket
        store_server.expiring = (bucket, store.settings.overlays_bucket)  # as `steelsight up` names them
        store_server.set_ttl(2)
        try:
            store.put(bucket, "ttl.png", b"x", "image/png")
            store.put(library, "models/kept.json", b"{}", "application/json")  # the library never expires
        finally:
            store_server.set_ttl(0)
            store_server.expiring = ()
        store.put(bucket, "kept.png", b"x", "image/png")
        filer = f"http://127.0.0.1:{store_server.ports['filer.port']}/buckets"
        ttl = {k: json.load(urllib.request.urlopen(f"{filer}/{k}?metadata=true"))["TtlSec"]
               for k in (f"{bucket}/ttl.png", f"{bucket}/kept.png", f"{library}/models/kept.json")}
        assert ttl == {f"{bucket}/ttl.png": 2 * 86400, f"{bucket}/kept.png": 0, f"{library}/models/kept.json": 0}


def test_a_key_that_may_not_manage_lifecycle_still_starts(store, store_server, caplog):
    """Least-privilege keys (deploy/minio/*-policy.json) may not touch lifecycle: the deployment sets it."""
    proxy = HttpFaultProxy(store_server.port).start()
    proxy.mode = "deny-lifecycle"
    try:
        limited = ObjectStore(store.settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{proxy.port}"}))
        limited.ensure_buckets()
    finally:
        proxy.stop()
    assert proxy.faulted >= 2 and "left to the deployment" in caplog.text


def test_a_missing_bucket_is_an_error_not_created_by_an_upload(store):
    with pytest.raises(S3Error, match="NoSuchBucket"):
        store.put("steelsight-no-such-bucket", "k.png", b"x", "image/png")


def test_wrong_credentials_fail_fast(store):
    bad = ObjectStore(store.settings.model_copy(update={"s3_secret_key": SecretStr("wrong-secret")}))
    started = time.monotonic()
    with pytest.raises((S3CredentialsRejected, S3AccessDenied), match="STEELSIGHT_S3_SECRET_KEY"):
        bad.ensure_buckets()
    assert time.monotonic() - started < 5


def test_services_starting_together_all_find_their_buckets(store):
    """Workers, producer and dashboard start at once and race to create the same new buckets."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(8):  # the losers' answers vary with timing (SeaweedFS may send an empty 409): race often
        n = next(_buckets)
        fresh = store.settings.model_copy(update={"frames_bucket": f"race-frames-{n}",
                                                  "overlays_bucket": f"race-ov-{n}"})
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _, fresh=fresh: ObjectStore(fresh).ensure_buckets(), range(6)))
        assert store.client.bucket_exists(fresh.frames_bucket) and store.client.bucket_exists(fresh.overlays_bucket)
