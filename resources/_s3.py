"""One S3 bucket, as the weights store and the serving pods' copy step use it (boto3).

The same calls on both targets: versitygw on the twin, MinIO on the homelab (path-style
addressing, SigV4). What the store relies on, and both servers do:

- **checksums**: every object is written with its SHA-256 (``x-amz-checksum-sha256``: the
  server refuses a body that does not match, ``BadDigest``) and reports it back on ``HEAD``;
  a file larger than one part is a multipart upload whose checksum is S3's composite one
  (the SHA-256 of its parts' SHA-256s, ``-<parts>``), computed here the same way;
- **conditional writes**: ``If-None-Match: *`` (create only) and ``If-Match: <etag>``
  (replace only what was read) answer 412 when another writer came first;
- an object appears whole or not at all (a killed upload leaves no object, at most an
  unfinished multipart upload, which :meth:`Bucket.abort_uploads` removes).

Nothing here imports Dagster: the copy step (:mod:`resources.weights_copy`) runs it in the
serving pod's init container. Credentials come from an AWS shared-credentials file (the
twin's generated keys) or boto3's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``~/.aws``); they are never logged, and no error message carries them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from homelab_dagster.errors import WeightsError

__all__ = ["Bucket", "FileHash", "Readable", "StoredObject", "file_keys", "hash_stream"]

_READ = 1 << 20
_PRECONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# An unknown key: S3's and MinIO's codes, and versitygw's (which answers it with a 404).
_REFUSED_KEYS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "XAdminUserNotFound"}


@dataclass(frozen=True)
class FileHash:
    """A file's SHA-256 (hex, what the tree digest takes) and the S3 checksum its upload in
    parts of ``part_size`` gets (base64; composite ``-<parts>`` above one part)."""

    sha256: str
    checksum: str
    size: int


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def hash_stream(stream: Readable, part_size: int) -> FileHash:
    """Read ``stream`` to its end once: its SHA-256 and its S3 checksum in ``part_size`` parts."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    part = hashlib.sha256()
    in_part = size = 0
    while chunk := stream.read(min(_READ, part_size - in_part)):
        whole.update(chunk)
        part.update(chunk)
        in_part += len(chunk)
        size += len(chunk)
        if in_part == part_size:
            parts.append(part.digest())
            part, in_part = hashlib.sha256(), 0
    if in_part or not parts:
        parts.append(part.digest())
    if len(parts) == 1:
        checksum = _b64(whole.digest())
    else:
        checksum = f"{_b64(hashlib.sha256(b''.join(parts)).digest())}-{len(parts)}"
    return FileHash(whole.hexdigest(), checksum, size)


def file_keys(credentials_file: str) -> tuple[str, str]:
    """(access key, secret) of the ``[default]`` profile of an AWS shared-credentials file
    (that file only: not the environment's keys, which boto3's chain would try first).

    Raises:
        WeightsError: the file is missing or holds no keys (named; never a value).
    """
    import botocore.credentials
    import botocore.exceptions

    provider = botocore.credentials.SharedCredentialProvider(
        creds_filename=credentials_file, profile_name="default"
    )
    try:
        found = provider.load() if Path(credentials_file).is_file() else None
    except botocore.exceptions.BotoCoreError as exc:
        raise WeightsError(f"cannot read the keys in {credentials_file}: {exc}") from None
    if found is None:
        raise WeightsError(
            f"{credentials_file} holds no aws_access_key_id and aws_secret_access_key under "
            "[default] (on the twin, `homelab twin up` writes it)"
        )
    return found.access_key, found.secret_key


class Bucket:
    """Bucket ``name`` at ``endpoint_url`` (None: AWS's own), through boto3.

    ``credentials_file``: an AWS shared-credentials file whose ``[default]`` profile signs the
    requests; None: boto3's chain (environment, ``~/.aws``). ``part_size``: above it a file
    is uploaded in parts of that size.
    """

    def __init__(
        self,
        name: str,
        endpoint_url: str | None,
        *,
        credentials_file: str | None = None,
        part_size: int = 64 << 20,
        region: str = "us-east-1",
    ) -> None:
        self.name = name
        self.endpoint_url = endpoint_url or None
        self.credentials_file = credentials_file
        self.part_size = part_size
        self.region = region
        self._client: Any = None

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            import botocore.config

            keys = file_keys(self.credentials_file) if self.credentials_file else (None, None)
            self._client = boto3.client(
                "s3",
                aws_access_key_id=keys[0],
                aws_secret_access_key=keys[1],
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=120,
                    # The store sends its own SHA-256 checksums; nothing more per request.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def keys(self) -> tuple[str, str]:
        """The access key and secret this bucket is reached with: its credentials file's, else
        boto3's own chain (``AWS_*`` variables, ``~/.aws``).

        Raises:
            WeightsError: there are none.
        """
        if self.credentials_file:
            return file_keys(self.credentials_file)
        import boto3

        found = boto3.session.Session().get_credentials()
        if found is None:
            raise WeightsError(
                f"no credentials for the store at {self.endpoint_url or 'AWS'}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (docs/deploy.md)"
            )
        frozen = found.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}".rstrip("/")

    def error(self, action: str, exc: BaseException) -> WeightsError:
        """A store error for ``action`` that says what failed and where, never a key."""
        import botocore.exceptions as bx

        where = f"at {self.endpoint_url or 'AWS'}"
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            why = "no credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are unset"
        elif isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError):
            why = "the object store does not answer (on the twin: `homelab twin up` starts it)"
        elif isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            why = f"{err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": ")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403 or err.get("Code") in _REFUSED_KEYS:
                why += " (the store refused the credentials)"
        else:
            why = str(exc) or type(exc).__name__
        return WeightsError(f"{action} ({where}): {why}")

    @staticmethod
    def _code(exc: BaseException) -> str:
        response = getattr(exc, "response", None) or {}
        code = response.get("Error", {}).get("Code", "")
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code if code not in ("", None) else status

    @classmethod
    def _is(cls, exc: BaseException, codes: set[str]) -> bool:
        """Whether ``exc`` is S3's answer ``codes`` (by its code; a HEAD, which has no body,
        by its status)."""
        return cls._code(exc) in codes

    # ------------------------------------------------------------------ bucket

    def ensure(self) -> bool:
        """Create the bucket unless it exists; whether it was created."""
        try:
            self.client.head_bucket(Bucket=self.name)
            return False
        except Exception as exc:
            if not self._is(exc, _NOT_FOUND | {"NoSuchBucket"}):
                raise self.error("cannot reach the bucket", exc) from None
        try:
            self.client.create_bucket(Bucket=self.name)
        except Exception as exc:
            if self._code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self.error("cannot create the bucket", exc) from None
        return True

    # ------------------------------------------------------------------ objects

    def objects(self, prefix: str) -> list[StoredObject]:
        """Every object below ``prefix`` (paginated)."""
        found: list[StoredObject] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix
            )
            for page in pages:
                for o in page.get("Contents") or []:
                    found.append(StoredObject(o["Key"], int(o["Size"])))
        except Exception as exc:
            if self._is(exc, {"NoSuchBucket"}):
                return []
            raise self.error(f"cannot list {self.uri(prefix)}", exc) from None
        return found

    def checksum(self, key: str) -> str | None:
        """The SHA-256 checksum the server keeps for ``key`` (None: no such object, or one
        written without a checksum)."""
        try:
            head = self.client.head_object(Bucket=self.name, Key=key, ChecksumMode="ENABLED")
        except Exception as exc:
            if self._is(exc, _NOT_FOUND | {"NoSuchBucket"}):
                return None
            raise self.error(f"cannot read {self.uri(key)}", exc) from None
        return head.get("ChecksumSHA256")

    def open(self, key: str) -> BinaryIO:
        """A stream of ``key``'s bytes.

        Raises:
            WeightsError: no such object, or the store does not answer.
        """
        try:
            body: BinaryIO = self.client.get_object(Bucket=self.name, Key=key)["Body"]
        except Exception as exc:
            raise self.error(f"cannot read {self.uri(key)}", exc) from None
        return body

    def read_json(self, key: str) -> tuple[Any, str] | None:
        """(the JSON document at ``key``, its ETag), or None when there is none."""
        try:
            got = self.client.get_object(Bucket=self.name, Key=key)
            return json.loads(got["Body"].read()), got["ETag"]
        except Exception as exc:
            if self._is(exc, _NOT_FOUND | {"NoSuchBucket"}):
                return None
            if isinstance(exc, ValueError):
                raise WeightsError(f"{self.uri(key)} is not JSON: {exc}") from None
            raise self.error(f"cannot read {self.uri(key)}", exc) from None

    def write_json(self, key: str, document: Any, *, etag: str | None) -> bool:
        """Write ``document`` at ``key`` only if it is still as read: ``etag`` None creates it
        (``If-None-Match: *``), else replaces exactly that version (``If-Match``). False:
        another writer came first (412), nothing was written."""
        body = json.dumps(document, indent=2).encode()
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(
                Bucket=self.name,
                Key=key,
                Body=body,
                ContentType="application/json",
                ChecksumSHA256=_b64(hashlib.sha256(body).digest()),
                **condition,
            )
        except Exception as exc:
            if self._is(exc, _PRECONDITION_FAILED):
                return False
            raise self.error(f"cannot write {self.uri(key)}", exc) from None
        return True

    def upload(self, key: str, path: Path, expected: FileHash) -> None:
        """Upload the file at ``path`` to ``key``; the server checks every request's body
        against the SHA-256 computed here and refuses one that does not match.

        Raises:
            WeightsError: the file changed since it was hashed, or the store refused it.
        """
        try:
            if expected.size <= self.part_size:
                with path.open("rb") as body:
                    self.client.put_object(
                        Bucket=self.name,
                        Key=key,
                        Body=body,
                        ChecksumSHA256=expected.checksum,
                    )
            else:
                self._upload_parts(key, path)
        except WeightsError:
            raise
        except Exception as exc:
            hint = (
                " (the file changed since it was hashed, or was damaged on the way)"
                if self._code(exc) in ("BadDigest", "XAmzContentChecksumMismatch")
                else ""
            )
            raise self.error(f"cannot upload {path} to {self.uri(key)}{hint}", exc) from None

    def _upload_parts(self, key: str, path: Path) -> None:
        started = self.client.create_multipart_upload(
            Bucket=self.name, Key=key, ChecksumAlgorithm="SHA256"
        )
        upload_id = started["UploadId"]
        parts = []
        try:
            with path.open("rb") as f:
                number = 0
                while data := f.read(self.part_size):
                    number += 1
                    checksum = _b64(hashlib.sha256(data).digest())
                    got = self.client.upload_part(
                        Bucket=self.name,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ChecksumSHA256=checksum,
                    )
                    parts.append(
                        {"PartNumber": number, "ETag": got["ETag"], "ChecksumSHA256": checksum}
                    )
            self.client.complete_multipart_upload(
                Bucket=self.name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # The store may be gone: then the next registration aborts it (abort_uploads).
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id)
            raise

    def copy_stream(self, key: str, stream: BinaryIO, size: int, expected: FileHash) -> None:
        """Upload ``stream`` (``size`` bytes, already hashed as ``expected``) to ``key``."""
        if size > self.part_size:
            # Large objects from another bucket go through a local file: multipart parts
            # must be re-read for their checksums, and a stream reads once.
            import tempfile

            with tempfile.NamedTemporaryFile() as tmp:
                while chunk := stream.read(_READ):
                    tmp.write(chunk)
                tmp.flush()
                self.upload(key, Path(tmp.name), expected)
            return
        data = stream.read()
        try:
            self.client.put_object(
                Bucket=self.name, Key=key, Body=data, ChecksumSHA256=expected.checksum
            )
        except Exception as exc:
            raise self.error(f"cannot write {self.uri(key)}", exc) from None

    def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (in batches of 1000)."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.name, Delete={"Objects": batch})
            except Exception as exc:
                raise self.error(f"cannot delete below {self.uri()}", exc) from None

    def abort_uploads(self, prefix: str, older_than_s: float) -> list[str]:
        """Abort the unfinished multipart uploads below ``prefix`` started more than
        ``older_than_s`` ago (left by a killed upload); the keys they were for."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        aborted: list[str] = []
        try:
            listed = self.client.list_multipart_uploads(Bucket=self.name, Prefix=prefix)
            for upload in listed.get("Uploads") or []:
                if upload["Initiated"] <= cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.name, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted.append(upload["Key"])
        except Exception as exc:
            if self._is(exc, {"NoSuchBucket"}):
                return []
            raise self.error(f"cannot list the unfinished uploads below {prefix}", exc) from None
        return aborted
