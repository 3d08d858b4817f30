"""`check(location, key)`: can fwray write where `key` (data.cache_dir, resources.storage_path) points? Asked before
any tokenizing or training, answered in one line that names the location and the fix.

On object storage a small object is written and deleted: only a write says whether the bucket exists, the
credentials are accepted and they may write there. Local: a folder, or the nearest existing folder above a missing
one, that this user may write.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..errors import FwrayError
from . import uri as locations

PROBE = ".fwray-write-check"
# what is wrong and the fix, by the AWS SDK's error names as pyarrow's messages carry them; in this order: an endpoint
# that does not answer or a missing bucket say nothing about credentials
S3_ERRORS = (
    (("NETWORK_CONNECTION", "curlCode", "Could not connect", "timed out"),
     "the endpoint {endpoint} does not answer", "start the store or fix AWS_ENDPOINT_URL"),
    (("NO_SUCH_BUCKET", "NoSuchBucket"), "the bucket {bucket!r} does not exist", "create it or fix {key}"),
    ((), "no credentials found", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, here and on every "
                                 "Ray node"),
    (("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId", "SignatureDoesNotMatch",
      "EXPIRED_TOKEN", "ExpiredToken", "INVALID_CLIENT_TOKEN_ID"),
     "the store refused the credentials", "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS_PROFILE in use"),
    (("ACCESS_DENIED", "AccessDenied"), "access denied to these credentials",
     "grant them s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on {bucket}"),
)
CREDENTIAL_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class StorageError(FwrayError):
    """A cache or storage location fwray cannot use: one line naming it and the fix."""

    exit_code = 2


def check(location: str, key: str) -> None:
    """Raises StorageError (one line) unless fwray can write at `location`, the value of setting `key`."""
    if locations.is_uri(location):
        _check_object_store(location, key)
    else:
        _check_folder(Path(location).expanduser(), key)


def _check_folder(folder: Path, key: str) -> None:
    for parent in (folder, *folder.parents):  # the nearest part of it that exists
        if parent.exists():
            break
    if not parent.is_dir():
        raise StorageError(f"{key} = {str(folder)!r}: {parent} is a file, not a folder; point {key} at a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"{key} = {str(folder)!r}: {parent} is not writable by this user; point {key} at a "
                           "folder you may write, or change its permissions")


def _check_object_store(location: str, key: str) -> None:
    try:
        fs, path = locations.filesystem(location)
        probe = f"{path}/{PROBE}-{uuid.uuid4().hex[:12]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"fwray")
        fs.delete_file(probe)
    except OSError as e:
        raise StorageError(describe(e, location, key)) from None


def describe(e: BaseException, location: str, key: str) -> str:
    """One line for an object-store error at `location`: what is wrong and the fix (the SDK's own words only when
    none fits: they carry request ids, never credentials)."""
    text = str(e)
    words = dict(bucket=location.partition("://")[2].split("/")[0], key=key,
                 endpoint=os.environ.get("AWS_ENDPOINT_URL") or "of the store")
    for names, what, fix in S3_ERRORS:
        if any(n in text for n in names) or (not names and not has_credentials()):
            return f"{key} = {location}: {what.format(**words)}; {fix.format(**words)}"
    detail = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return f"{key} = {location}: the store said: {detail}; check {key}, AWS_ENDPOINT_URL and the credentials"


def has_credentials() -> bool:
    """Whether the usual places name credentials (environment, a profile file). An instance role is invisible here,
    so this only words an error, never refuses."""
    if any(os.environ.get(k) for k in CREDENTIAL_ENVS):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return any(Path(f).expanduser().is_file() for f in files)
