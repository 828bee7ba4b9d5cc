"""The directory adapter: ``file:///ABSOLUTE/PATH``, for example on a shared mount."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from pytest_mlcjit._util.fs import write_temp
from pytest_mlcjit.cache.store.remote.base import (
    CHUNK,
    Chunks,
    Remote,
    RemoteOptions,
    StoredObject,
)
from pytest_mlcjit.cache.store.remote.url import RemoteURL
from pytest_mlcjit.errors import (
    BadURL,
    RemoteAuthError,
    RemoteConfigError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)
from pytest_mlcjit.key import file_sha256


# -- a directory ----------------------------------------------------------------------------
class FileRemote(Remote):
    """A directory, e.g. on a shared mount. Every write goes to a temp file (``.*.tmp``,
    never listed) that is fsynced and renamed into place; manifests are created with a hard
    link, which fails if the name exists, so publishing is create-only."""

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        super().__init__(url, options)
        self.root = Path(url.path)
        if not self.root.is_dir():
            raise RemoteConfigError(f"remote cache directory {self.root} (from {url.redacted}) "
                                    "does not exist or is not a directory; create it or fix "
                                    "the URL")

    @classmethod
    def parse_url(cls, parts: urllib.parse.SplitResult) -> RemoteURL:
        if parts.netloc not in ("", "localhost"):
            raise BadURL(f"a file URL names no host ({parts.netloc!r}); use three slashes and "
                         "an absolute path")
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise BadURL("the path is not absolute")
        path = os.path.normpath(path)
        return RemoteURL("file", "", "", path, "file://" + urllib.parse.quote(path))

    @contextlib.contextmanager
    def _calling(self, action: str, name: str) -> Iterator[None]:
        """Map OSError raised inside to RemoteError, naming the file."""
        try:
            yield
        except PermissionError as exc:
            raise RemoteAuthError(f"{action} {self._location(name)} was refused "
                                  f"({exc.strerror}); check the directory's permissions") from None
        except OSError as exc:
            if not self.root.is_dir():
                raise RemoteConfigError(f"remote cache directory {self.root} has gone "
                                        f"({action} {self._location(name)})") from None
            raise RemoteUnavailableError(f"{action} {self._location(name)} failed "
                                         f"({exc.strerror or exc})") from None

    def _check_root(self) -> None:
        """FileNotFoundError (made "has gone" by :meth:`_calling`) once the remote's
        directory is gone (an unmounted share): never a silent miss, never an upload that
        makes the directory again where no other machine sees it."""
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the remote directory has gone", self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def _location(self, name: str) -> str:
        return "file://" + urllib.parse.quote(str(self._path(name)))

    def _list(self, prefix: str) -> Iterator[StoredObject]:
        base = self._path(prefix)
        with self._calling("listing", prefix):
            self._check_root()
            if not base.is_dir():
                return
            for top, dirs, files in os.walk(base, onerror=_raise):  # unreadable: no miss
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(files):
                    if file.startswith("."):
                        continue
                    path = Path(top, file)
                    try:
                        st = path.lstat()
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue  # a FIFO, a device or a link: never an object of ours
                    yield StoredObject(path.relative_to(self.root).as_posix(), st.st_size,
                                       st.st_mtime)

    def _open_stream(self, name: str) -> Chunks | None:
        with self._calling("reading", name):
            try:
                # Never through a link, and never blocked on a FIFO someone planted.
                fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                self._check_root()
                return None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                fd = -1
            if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
                if fd >= 0:
                    os.close(fd)
                raise RemoteIntegrityError(f"{self._location(name)} is not a regular file "
                                           "(a link, a FIFO or a device): not read")
            f = open(fd, "rb")  # noqa: SIM115 (the generator closes it)
        return self._chunks(name, f)

    def _chunks(self, name: str, f: Any) -> Chunks:
        with f, self._calling("reading", name):
            yield from iter(lambda: f.read(CHUNK), b"")

    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        # The bytes read and hashed: a file has no checksum of its own.
        path = self._path(name)
        with self._calling("checking", name):
            try:
                return path.stat().st_size == size and file_sha256(path) == sha256
            except FileNotFoundError:
                self._check_root()
                return False

    def _stat(self, name: str) -> StoredObject | None:
        with self._calling("checking", name):
            try:
                st = self._path(name).stat()
            except FileNotFoundError:
                self._check_root()
                return None
        return StoredObject(name, st.st_size, st.st_mtime)

    def _touch(self, name: str) -> None:
        with self._calling("touching", name), contextlib.suppress(FileNotFoundError):
            os.utime(self._path(name))

    def _write_temp(self, path: Path, chunks: Iterator[bytes]) -> tuple[Path, str]:
        """Write ``chunks`` to a new fsynced temp file beside ``path``; (temp, sha256)."""
        self._check_root()
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_temp(path, chunks)

    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        path = self._path(name)
        with open(library, "rb") as src, self._calling("uploading", name):
            tmp, actual = self._write_temp(path, iter(lambda: src.read(CHUNK), b""))
            try:
                if actual != sha256:
                    raise RemoteIntegrityError(
                        f"uploading {library} to {self._location(name)} failed: it changed "
                        f"while being copied (sha256 {actual}, expected {sha256})")
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        path = self._path(name)
        with self._calling("publishing", name):
            tmp, _ = self._write_temp(path, iter([data]))
            try:
                if not create_only:
                    os.replace(tmp, path)
                    return True
                try:
                    os.link(tmp, path)  # fails if the name exists: create-only
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    raise RemoteConfigError(
                        f"remote cache directory {self.root} is on a filesystem without hard "
                        "links, which publishing needs (create-only); use another directory "
                        "or an s3:// remote") from None
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _delete(self, name: str) -> None:
        with self._calling("removing", name), contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def _prune_leftovers(self, cutoff: float) -> list[str]:
        """The temp files of writers that died, older than ``cutoff`` (the blob grace
        period: a live writer's temp file is younger)."""
        removed: list[str] = []
        with self._calling("pruning", ""):
            for top, _dirs, files in os.walk(self.root):
                for file in files:
                    path = Path(top, file)
                    with contextlib.suppress(FileNotFoundError):
                        if (file.startswith(".") and file.endswith(".tmp")
                                and path.lstat().st_mtime < cutoff):
                            path.unlink()
                            removed.append("file://" + urllib.parse.quote(str(path)))
        return removed


def _raise(exc: OSError) -> NoReturn:
    raise exc
