"""Where corpora live: a local folder, or object storage through fsspec.

`open_storage("DIR")` is a folder on this machine; `open_storage("s3://bucket/prefix")` (or any
other URL whose fsspec implementation is installed: gs://, az://, ...) is object storage, reached
with the credentials and endpoint of the standard environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, profiles). Both are a `Storage`: names are relative
paths under the root, writes appear whole or not at all, and failures are domain errors naming
the URL, never a credential.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .errors import EmbedServeCoreError, InvalidInput, NotFound, NotPermitted, Unavailable

# Objects are copied in pieces of this size, so a shard never sits in memory whole.
COPY_CHUNK_BYTES = 8 << 20
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Botocore error codes that mean the credentials, not the object, are wrong.
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccessDenied", "403"}
)


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` other than file://: object storage, not a local folder."""
    match = _SCHEME.match(str(location))
    return match is not None and match.group(1).lower() != "file"


def redact(url: str) -> str:
    """The URL without user information (`s3://KEY:SECRET@bucket` -> `s3://bucket`): safe to log."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url)


def check_relative(name: str, what: str = "name") -> PurePosixPath:
    """A relative path with no `..`, NUL or backslash; InvalidInput otherwise."""
    if not name or "\0" in name or "\\" in name:
        raise InvalidInput(f"{what} {name!r} is not a relative path")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise InvalidInput(f"{what} {name!r} must be a relative path inside the data folder")
    return relative


class Storage(ABC):
    """Files under one root, by relative name."""

    @property
    @abstractmethod
    def location(self) -> str:
        """The root, as the user named it (credentials removed): for messages and logs."""

    @property
    def is_local(self) -> bool:
        return False

    def url_of(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def warm_up(self) -> None:  # noqa: B027 (only remote storage has anything to warm)
        """Readies the client (sessions, credentials, connections) so the first stream does not wait."""

    @abstractmethod
    def read_bytes(self, name: str, *, limit: int) -> bytes:
        """The whole object; InvalidInput when larger than `limit` bytes, NotFound when absent."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes the object whole: a reader sees the old content or the new, never a part."""

    @abstractmethod
    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[IO[bytes]]:
        """A file to write the object into; it appears under `name` only when the block ends
        without an error."""

    @abstractmethod
    def download(self, name: str, destination: Path, on_chunk: Callable[[bytes], None]) -> int:
        """Copies the object into `destination` (a new local file), a chunk at a time, handing each
        chunk to `on_chunk` too (to hash it); returns its size."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Removes the object; nothing when it is not there."""


class LocalStorage(Storage):
    """A folder on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def is_local(self) -> bool:
        return True

    def url_of(self, name: str) -> str:
        return str(self.root / name)

    def path(self, name: str) -> Path:
        return self.root.joinpath(*check_relative(name).parts)

    def read_bytes(self, name: str, *, limit: int) -> bytes:
        path = self.path(name)
        try:
            if path.stat().st_size > limit:
                raise InvalidInput(f"{path} is larger than {limit} bytes")
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path} not found") from None
        except PermissionError:
            raise NotPermitted(f"{path}: permission denied") from None

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as out:
            out.write(data)

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[IO[bytes]]:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            # mkstemp makes the file private; corpus files are read by servers running as other users.
            os.fchmod(handle, 0o666 & ~_umask())
            with os.fdopen(handle, "wb") as out:
                yield out
            os.replace(temporary, path)  # a reader opens the old file or the new one
        finally:
            Path(temporary).unlink(missing_ok=True)

    def download(self, name: str, destination: Path, on_chunk: Callable[[bytes], None]) -> int:
        size = 0
        try:
            with self.path(name).open("rb") as source, destination.open("xb") as out:
                while chunk := source.read(COPY_CHUNK_BYTES):
                    on_chunk(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise NotFound(f"{self.path(name)} not found") from None
        return size

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)


class FsspecStorage(Storage):
    """Object storage (or any fsspec filesystem) under a URL's prefix."""

    def __init__(self, url: str, filesystem: Any | None = None) -> None:
        self._url = url.rstrip("/")
        self._shown = redact(self._url)
        self._filesystem = filesystem
        self._lock = threading.Lock()
        if filesystem is None:
            _filesystem_class(self._url)  # an unknown scheme fails now, not at the first read

    @property
    def _fs(self) -> Any:
        # Made on first use: a server forks its workers before any, and a filesystem's event loop
        # and connections must not cross a fork.
        with self._lock:
            if self._filesystem is None:
                self._filesystem = _filesystem_class(self._url)(
                    skip_instance_cache=True, **_filesystem_class(self._url)._get_kwargs_from_urls(self._url)
                )
            return self._filesystem

    @property
    def _root(self) -> str:
        root: str = self._fs._strip_protocol(self._url).rstrip("/")
        return root

    @property
    def location(self) -> str:
        return self._shown

    @property
    def url(self) -> str:
        """The URL as given, with any credentials in it: for opening it elsewhere, never to show."""
        return self._url

    def _path(self, name: str) -> str:
        return f"{self._root}/{check_relative(name).as_posix()}"

    def warm_up(self) -> None:
        # The first request of a new client resolves credentials and opens a connection; the
        # answer is not needed, and a failure here is reported again by the first real read.
        with contextlib.suppress(Exception):
            self._fs.exists(self._root)

    def read_bytes(self, name: str, *, limit: int) -> bytes:
        with storage_errors(self.url_of(name)):
            # One ranged GET: its error, unlike a HEAD's, says why (InvalidAccessKeyId, NoSuchBucket).
            data: bytes = self._fs.cat_file(self._path(name), start=0, end=limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"{self.url_of(name)} is larger than {limit} bytes")
        return data

    def exists(self, name: str) -> bool:
        with storage_errors(self.url_of(name)):
            return bool(self._fs.exists(self._path(name)))

    def write_bytes(self, name: str, data: bytes) -> None:
        # One PUT: the object store shows the old object or the new one.
        with storage_errors(self.url_of(name)):
            self._fs.pipe_file(self._path(name), data)

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[IO[bytes]]:
        # Staged on local disk, then uploaded in one piece: an object appears only when complete.
        with tempfile.NamedTemporaryFile(prefix="embedserve-upload-", suffix=".partial") as staged:
            yield staged
            staged.flush()
            with storage_errors(self.url_of(name)):
                self._fs.put_file(staged.name, self._path(name))

    def download(self, name: str, destination: Path, on_chunk: Callable[[bytes], None]) -> int:
        size = 0
        with (
            storage_errors(self.url_of(name)),
            self._fs.open(self._path(name), "rb", block_size=COPY_CHUNK_BYTES) as source,
            destination.open("xb") as out,
        ):
            while chunk := source.read(COPY_CHUNK_BYTES):
                on_chunk(chunk)
                out.write(chunk)
                size += len(chunk)
        return size

    def delete(self, name: str) -> None:
        with storage_errors(self.url_of(name)), contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(name))


def open_storage(location: str | os.PathLike[str]) -> Storage:
    """The Storage a --data-dir names: a URL through fsspec, anything else a local folder."""
    text = str(location)
    if is_url(text):
        return FsspecStorage(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalStorage(Path(text))


def _filesystem_class(url: str) -> Any:
    import fsspec  # type: ignore[import-untyped]  # torch requires it, so it is always there; its backends (s3fs, gcsfs) are extras

    scheme = _SCHEME.match(url)
    protocol = scheme.group(1).lower() if scheme else "file"
    try:
        return fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        extra = " (pip install 'embedserve[s3]')" if protocol in ("s3", "s3a") else ""
        raise InvalidInput(
            f"{redact(url)}: no filesystem for {protocol}:// is installed{extra}: {error}"
        ) from None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turns a filesystem's failures into domain errors that name `url` and no credential."""
    shown = redact(url)
    try:
        yield
    except EmbedServeCoreError:
        raise
    except FileNotFoundError:
        raise NotFound(f"{shown} not found (no such bucket or object)") from None
    except PermissionError as error:
        raise NotPermitted(f"{shown}: access denied: {_credential_hint(error)}") from None
    except Exception as error:
        code = _error_code(error)
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            raise NotFound(f"{shown} not found (no such bucket or object)") from None
        if code in _CREDENTIAL_CODES or type(error).__name__ in (
            "NoCredentialsError",
            "PartialCredentialsError",
        ):
            raise NotPermitted(f"{shown}: access denied: {_credential_hint(error)}") from None
        if isinstance(error, (OSError, TimeoutError)) or _is_connection_error(error):
            raise Unavailable(
                f"{shown}: the object store cannot be reached ({type(error).__name__})"
            ) from None
        raise


def _error_code(error: BaseException) -> str:
    """The S3 error code of a botocore ClientError, also when s3fs wrapped it in an OSError."""
    for candidate in (error, error.__cause__, error.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _credential_hint(error: BaseException) -> str:
    code = _error_code(error) or type(error).__name__
    # The code only: botocore's messages are safe, but a wrapper could echo a request's headers.
    return (
        f"{code}; check the credentials in the environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the bucket's policy"
    )


def _is_connection_error(error: BaseException) -> bool:
    names = {
        type(candidate).__name__ for candidate in (error, error.__cause__, error.__context__) if candidate
    }
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
            "ConnectionError",
        }
    )


@functools.cache
def _umask() -> int:
    current = os.umask(0)  # the only way to read it; done once
    os.umask(current)
    return current


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
