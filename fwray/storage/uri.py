"""Locations that are a local path or an object-store URI (`s3://bucket/prefix`, `gs://bucket/prefix`), read and
written through `pyarrow.fs`.

S3 takes its endpoint from AWS_ENDPOINT_URL (MinIO, moto, any S3-compatible store) and its region from AWS_REGION or
AWS_DEFAULT_REGION; credentials come only from where the AWS SDK looks (environment, profile, instance role): fwray
never reads, prints or records them. Connections give up within seconds, so a dead endpoint is an error, not a wait.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from ..config import URI_SCHEMES

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0  # a socket that stays silent this long: a large upload keeps it busy
ATTEMPTS = 3
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")  # what says where, never who


def is_uri(location: str | os.PathLike) -> bool:
    return urlparse(str(location)).scheme in URI_SCHEMES


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` for a URI or a local path (pathlib would fold a URI's `//`)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def name(location: str | os.PathLike) -> str:
    """The last part of a URI or a path."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def local_root() -> Path:
    """This machine's (this node's) own disk for what fwray keeps beside object storage: under the system temp
    folder ($TMPDIR), which every Ray node has."""
    return Path(tempfile.gettempdir()) / "fwray"


def absolute(location: str | os.PathLike) -> str:
    """A URI as it is, a local path expanded and made absolute: a location other processes (Ray's) can be handed."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def local_mirror(location: str | os.PathLike) -> Path:
    """The local folder that holds a location's files: the folder itself, or for a URI one on this node's disk
    named after it (a run's logs, curves and model are written there before they are uploaded)."""
    if not is_uri(location):
        return Path(absolute(location))
    scheme, _, rest = str(location).partition("://")
    return local_root() / "mirror" / scheme / rest.strip("/")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for an object-store URI."""
    import pyarrow.fs as pafs

    scheme, _, rest = uri.partition("://")
    if scheme != "s3":
        return pafs.FileSystem.from_uri(uri)
    fs = pafs.S3FileSystem(endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None,
                           region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
                           connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS))
    return fs, rest.rstrip("/")


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """The size of each file directly in `folder`, by name, from one listing (on object storage one request, not one
    per file); {} where there is no such folder."""
    if not is_uri(folder):
        if not os.path.isdir(folder):
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
    import pyarrow.fs as pafs

    fs, path = filesystem(str(folder))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {name(i.path): i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """A whole object (an object store shows none until its upload completes), or a local file."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_bytes(data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(location: str) -> None:
    """A file, if there is one."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    if exists(location):
        fs.delete_file(path)


def upload(local: str | os.PathLike, uri: str) -> None:
    """A local file, or a folder with its files, copied to an object-store URI."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local: str | os.PathLike) -> None:
    """An object copied to a local file, or every object under a prefix to a local folder."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    folder = Path(local) if fs.get_file_info(path).type == pafs.FileType.Directory else Path(local).parent
    folder.mkdir(parents=True, exist_ok=True)  # copy_files writes into folders that exist
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def endpoint_env() -> dict[str, str]:
    """The environment a worker needs to find the object store (never a credential)."""
    return {k: os.environ[k] for k in ENDPOINT_ENVS if os.environ.get(k)}
