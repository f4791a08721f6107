"""Redis and S3 clients built from :class:`Settings`, plus the errors worth retrying."""

from __future__ import annotations

import io
import ssl
from datetime import timedelta

import redis
import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

from .contract import Settings

# errors that mean "the service is not there right now", not "the request is wrong"
REDIS_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
S3_TRANSIENT = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError, ServerError)
# ...unless caused by one of these, which no amount of waiting fixes
PERMANENT = (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError,
             ssl.SSLCertVerificationError)
MISSING_OBJECT_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


class MissingObject(LookupError):
    """The frame's object key does not exist: retrying will not help."""


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
    )


def _minio(settings: Settings, endpoint: str, secure: bool) -> Minio:
    if settings.s3_access_key is None or settings.s3_secret_key is None:
        raise RuntimeError("S3 credentials missing: set STEELSIGHT_S3_ACCESS_KEY and STEELSIGHT_S3_SECRET_KEY")
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=3, read=20), retries=False, maxsize=8)
    return Minio(endpoint, access_key=settings.s3_access_key.get_secret_value(),
                 secret_key=settings.s3_secret_key.get_secret_value(), secure=secure, region=settings.s3_region,
                 http_client=http)


class ObjectStore:
    """Frames and overlays in S3/MinIO; buckets are created private."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = _minio(settings, settings.s3_endpoint, settings.s3_secure)
        public = settings.s3_public_endpoint
        self.public_client = _minio(
            settings, public, settings.s3_public_secure if settings.s3_public_secure is not None else settings.s3_secure
        ) if public else self.client

    def ensure_buckets(self) -> None:
        for bucket in (self.settings.frames_bucket, self.settings.overlays_bucket):
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
        try:
            response = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code in MISSING_OBJECT_CODES:
                raise MissingObject(f"{bucket}/{key}: {exc.code}") from exc
            raise
        try:
            return response.read(max_bytes + 1 if max_bytes else None)
        finally:
            response.close()
            response.release_conn()

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.stat_object(bucket, key)
            return True
        except S3Error as exc:
            if exc.code in MISSING_OBJECT_CODES:
                return False
            raise

    def presigned_url(self, bucket: str, key: str) -> str:
        """Signed for the public endpoint, expiring after ``presign_expiry_s``."""
        return self.public_client.presigned_get_object(
            bucket, key, expires=timedelta(seconds=self.settings.presign_expiry_s)
        )
