"""Redis and S3 clients built from :class:`Settings`, plus the errors worth retrying."""

from __future__ import annotations

import io
import logging
import ssl
import time
from datetime import timedelta

import redis
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from .contract import Settings

log = logging.getLogger("steelsight.s3")
# errors that mean "the service is not there right now", not "the request is wrong"
# READONLY: a replica answering while a failover promotes another node; LOADING: restarting from its log
REDIS_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
                   redis.exceptions.ReadOnlyError)
_S3_NETWORK = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError, ServerError)
# S3 error codes that mean "busy or starting, ask again", whatever the HTTP status
S3_RETRY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                  "XMinioServerNotInitialized", "XMinioReadQuorum", "XMinioWriteQuorum"}
# 5xx answers that will not change on a retry: the store lacks the feature
S3_UNSUPPORTED_CODES = {"NotImplemented", "MethodNotAllowed"}
S3_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                 "RequestTimeTooSkewed"}


def s3_transient(exc: BaseException) -> bool:
    """Network failures, and any 5xx or 429 however it is dressed: MinIO's XML ``503 SlowDown``
    comes back as ``S3Error``, a load balancer's HTML ``502`` as ``InvalidResponseError``."""
    if isinstance(exc, S3Error):
        if exc.code in S3_UNSUPPORTED_CODES:
            return False
        status = getattr(exc.response, "status", 0) or 0
        return exc.code in S3_RETRY_CODES or status >= 500 or status == 429
    if isinstance(exc, InvalidResponseError):
        status = exc._code if isinstance(exc._code, int) else 0  # the SDK keeps the HTTP status only here
        return status not in (501, 505) and (status >= 500 or status == 429)
    return isinstance(exc, _S3_NETWORK)


class S3CredentialsRejected(PermissionError):
    """The object store refused the access key or its signature (or the clock is off): waiting will not fix it."""


class S3AccessDenied(PermissionError):
    """The store refused a bucket request: the key lacks a grant, or (a HEAD's 403 has no body to tell) it is wrong."""


# ...unless caused by one of these, which no amount of waiting fixes
PERMANENT = (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError,
             ssl.SSLCertVerificationError, S3CredentialsRejected, S3AccessDenied)
EXPIRY_RULE_ID = "steelsight-expiry"
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

    def ensure_buckets(self, library: bool = True) -> None:
        """Create missing buckets (private: no policy, no ACL grant) and keep their expiry rule current.

        ``library``: the library bucket too (models and feedback, no expiry); the producer never uses it,
        and its least-privilege key may not even look at it.
        """
        try:
            for bucket in (self.settings.frames_bucket, self.settings.overlays_bucket):
                if not self.client.bucket_exists(bucket):
                    self._make_bucket(bucket)
                self._set_expiry(bucket, self.settings.object_expiry)
            if library and not self.client.bucket_exists(self.settings.library_bucket):
                self._make_bucket(self.settings.library_bucket)
        except S3Error as exc:
            where = f"the object store at {self.settings.s3_endpoint}"
            if exc.code in S3_AUTH_CODES:
                hint = ("this machine's clock is off: sync it (NTP)" if exc.code == "RequestTimeTooSkewed" else
                        "check STEELSIGHT_S3_ACCESS_KEY and STEELSIGHT_S3_SECRET_KEY")
                raise S3CredentialsRejected(f"{where} refused the credentials ({exc.code}): {hint}") from exc
            if exc.code == "AccessDenied":
                # a HEAD's 403 has no body, so a wrong secret and a missing grant look alike here
                raise S3AccessDenied(
                    f"{where} denied {exc.resource or 'a bucket request'} (AccessDenied): check "
                    "STEELSIGHT_S3_ACCESS_KEY and STEELSIGHT_S3_SECRET_KEY, and that the key may see "
                    f"{self.settings.frames_bucket}, {self.settings.overlays_bucket} and "
                    f"{self.settings.library_bucket} (and create them unless "
                    "they exist)") from exc
            raise

    def _make_bucket(self, bucket: str) -> None:
        try:
            self.client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # another service was first
                return
            if exc.code not in ("NoSuchBucket", "OperationAborted", "ResourceConflict"):
                raise
            # a create racing another's may get an empty 409 (which the SDK names NoSuchBucket) while
            # the winner's bucket is still settling: it is fine if the bucket turns up
            for _ in range(20):
                if self.client.bucket_exists(bucket):
                    return
                time.sleep(0.1)
            raise

    def _set_expiry(self, bucket: str, days: int) -> None:
        """Our one lifecycle rule, beside any the operator added; 0 removes it.

        A least-privilege key may not manage lifecycle: then the rule is the deployment's
        job (``deploy/minio/init.sh``; SeaweedFS enforces a TTL instead, see ``devstack``),
        and the service says so and goes on.
        """
        try:
            self._write_expiry(bucket, days)
        except S3Error as exc:
            if exc.code not in {"AccessDenied", *S3_UNSUPPORTED_CODES}:
                raise
            log.warning("object expiry of %s left to the deployment: %s (%s)", bucket, exc.code,
                        "this key may not manage lifecycle rules" if exc.code == "AccessDenied" else "unsupported")

    def _write_expiry(self, bucket: str, days: int) -> None:
        try:
            config = self.client.get_bucket_lifecycle(bucket)
        except S3Error as exc:
            if exc.code != "NoSuchLifecycleConfiguration":
                raise
            config = None
        others = [r for r in (config.rules if config else []) if r.rule_id != EXPIRY_RULE_ID]
        ours = [Rule(ENABLED, rule_filter=Filter(prefix=""), rule_id=EXPIRY_RULE_ID, expiration=Expiration(days=days))
                ] if days else []
        current = [r.expiration.days for r in (config.rules if config else []) if r.rule_id == EXPIRY_RULE_ID]
        if current == [r.expiration.days for r in ours]:
            return  # already in place: every service calls this at start
        if others or ours:
            self.client.set_bucket_lifecycle(bucket, LifecycleConfig(others + ours))
        else:
            self.client.delete_bucket_lifecycle(bucket)

    def put(self, bucket: str, key: str, data: bytes, content_type: str,
            metadata: dict[str, str] | None = None) -> None:
        """``metadata`` travels as ``x-amz-meta-*`` headers: ASCII, a few KB at most."""
        self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=metadata)

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

    def put_file(self, bucket: str, key: str, path, content_type: str) -> None:
        """A file streamed from disk (a checkpoint is tens of MB: not held in memory twice)."""
        self.client.fput_object(bucket, key, str(path), content_type=content_type)

    def get_file(self, bucket: str, key: str, path) -> None:
        try:
            self.client.fget_object(bucket, key, str(path))
        except S3Error as exc:
            if exc.code in MISSING_OBJECT_CODES:
                raise MissingObject(f"{bucket}/{key}: {exc.code}") from exc
            raise

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""
        return sorted(o.object_name for o in self.client.list_objects(bucket, prefix=prefix, recursive=True))

    def size(self, bucket: str, key: str) -> int | None:
        """The object's size in bytes; None when there is none."""
        try:
            return self.client.stat_object(bucket, key).size
        except S3Error as exc:
            if exc.code in MISSING_OBJECT_CODES:
                return None
            raise

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
