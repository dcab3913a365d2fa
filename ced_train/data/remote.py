"""Shard directories at URLs: fetched once into a local cache, each tar checked against the manifest's sha256.

A shard directory (`data.train_shards`, `data.val_shards`, `evaluate.shards`, `evaluate.baseline_shards`, or any
`read_manifest` argument) may be a URL: `https://host/shards/train`, `file:///mnt/nfs/shards/train`, `s3://bucket/
shards/train` (any scheme fsspec opens; s3, gs, az... need their fsspec plugin: s3fs, gcsfs, adlfs), or a webdataset-
style `pipe:` command with `{}` where the file name goes (`pipe:aws s3 cp s3://bucket/shards/train/{} -`), run by the
shell, its stdout the file. `local_shards_dir(url)` fetches `manifest.json`, `skipped.tsv` and every tar the manifest
lists into `$CED_CACHE_DIR/shards/<tail>-<hash of url>/` and returns that directory, which `read_manifest` then reads
like any other: the readers, the fingerprint checks and exact replay do not know where the bytes came from. Clip
ranges need random access, hence a local copy rather than a stream.

Why not webdataset's `gopen`: it opens http(s) through the `curl` binary with `-s` (a 404 becomes "exit 22"; slim
images have no curl) and gs through `gsutil`; fsspec comes with Lightning (aiohttp included), names the HTTP status
and reaches object stores through its plugins, and `pipe:` needs the `{}` template anyway.

The cache keeps one invariant: its `manifest.json` is written last, after every tar it lists was verified (byte count
and sha256), each under a temporary name then renamed. A resolution fetches the remote manifest (its one request when
nothing changed); equal to the cached one, with every tar of its recorded size, nothing else is fetched; else the
cached manifest is removed first, tars already there are re-hashed and kept if they match, and the others fetched.
Processes that resolve the same URL at once (DDP ranks, a rerun) take turns on an flock of the cache directory, so
each file is fetched once. A process resolves a URL once and reuses the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ced_train.data.manifest import MANIFEST_NAME, SKIPPED_NAME
from ced_train.data.shards import file_sha256

CACHE_ENV = "CED_CACHE_DIR"
PIPE = "pipe:"
PARALLEL_FETCHES = 8  # object stores serve one stream at about 100 MB/s; several fill a faster link
CHUNK_BYTES = 1 << 20
LOCK_NAME = ".lock"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # file names go into shell commands and cache paths
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

_resolved: set[Path] = set()  # cache directories of the URLs this process has resolved


class RemoteShardError(OSError):
    """A shard directory URL that could not be fetched or verified; `str()` is one line naming the URL."""


def is_url(text: str | os.PathLike) -> bool:
    """True for `scheme://...` and `pipe:...` (a shard directory to fetch); False for a local path."""
    text = str(text)
    return bool(_URL.match(text)) or text.startswith(PIPE)


def cache_dir() -> Path:
    """`$CED_CACHE_DIR`, else `$XDG_CACHE_HOME/ced-train`, else `~/.cache/ced-train`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ced-train"


def shards_cache_path(url: str) -> Path:
    """Where `url`'s files are cached: a readable tail of the URL and a hash of all of it."""
    tail = re.split(r"[/:\s]+", url.split("{}")[0].rstrip("/ "))[-1]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail)[-40:].lstrip("._-") or "shards"
    return cache_dir() / "shards" / f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def file_url(url: str, name: str) -> str:
    """The URL of file `name` of the shard directory `url` (`{}` of a `pipe:` command replaced by it)."""
    if url.startswith(PIPE):
        return url.replace("{}", name)
    return f"{url.rstrip('/')}/{name}"


def local_shards_dir(url: str) -> Path:
    """The local copy of the shard directory at `url`, fetched and verified if needed (see the module docstring).

    Raises:
        RemoteShardError: one line naming the URL of the file that could not be fetched or does not match.
    """
    if url.startswith(PIPE) and "{}" not in url:
        raise RemoteShardError(f"{url}: a pipe: shard directory needs {{}} where the file name goes, e.g. "
                               "pipe:aws s3 cp s3://bucket/shards/train/{} -")
    url = url if url.startswith(PIPE) else url.rstrip("/")
    root = shards_cache_path(url)
    if root in _resolved:
        return root
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        _remove_partials(root)  # of a process that was killed: whoever wrote them held this lock
        manifest_bytes = _fetch_bytes(url, MANIFEST_NAME, root)
        shards = _listed_shards(file_url(url, MANIFEST_NAME), manifest_bytes)
        cached = root / MANIFEST_NAME
        if cached.is_file() and cached.read_bytes() == manifest_bytes and all(
                _has_size(root / shard.name, shard.bytes) for shard in shards):
            fetched = []
        else:
            cached.unlink(missing_ok=True)  # the copy is incomplete until the manifest is back
            fetched = [shard for shard in shards if not _verified(root / shard.name, shard)]
            _fetch_shards(url, root, fetched)
            _fetch_skipped(url, root)
            _write_atomic(cached, manifest_bytes)
    _resolved.add(root)
    seconds = time.perf_counter() - start
    megabytes = sum(shard.bytes for shard in fetched) / 1e6
    done = (f"fetched and verified {len(fetched)} of {len(shards)} shards ({megabytes:.1f} MB) in {seconds:.1f} s "
            f"({megabytes / max(seconds, 1e-9):.1f} MB/s) into" if fetched else f"all {len(shards)} shards cached in")
    print(f"shards {url}: {done} {root}", file=sys.stderr, flush=True)
    return root


@dataclass(frozen=True)
class _Listed:
    name: str
    bytes: int
    sha256: str


def _listed_shards(where: str, manifest_bytes: bytes) -> list[_Listed]:
    """The tars a fetched manifest lists (`read_manifest` checks the rest once they are local)."""
    try:
        shards = [_Listed(s["name"], int(s["bytes"]), s["sha256"]) for s in json.loads(manifest_bytes)["shards"]]
    except (ValueError, KeyError, TypeError) as error:
        raise RemoteShardError(f"{where}: not a shard manifest ({type(error).__name__}: {error})") from None
    unsafe = [shard.name for shard in shards if not _SAFE_NAME.fullmatch(shard.name)]
    if unsafe:
        raise RemoteShardError(f"{where}: shard names must match {_SAFE_NAME.pattern}, found {unsafe[:3]}")
    return shards


@contextmanager
def _locked(root: Path):
    """Hold an exclusive flock on `root/.lock` (released by the kernel if the process dies)."""
    import fcntl

    with open(root / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"shards: waiting for another process fetching into {root}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")


def _remove_partials(root: Path) -> None:
    for path in root.glob(".*.partial-*"):
        path.unlink(missing_ok=True)


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _verified(path: Path, shard: _Listed) -> bool:
    return _has_size(path, shard.bytes) and file_sha256(path) == shard.sha256


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _partial(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fetch_bytes(url: str, name: str, root: Path) -> bytes:
    tmp = _partial(root / name)
    try:
        _fetch(file_url(url, name), tmp)
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_skipped(url: str, root: Path) -> None:
    """`skipped.tsv` when the directory has one; it only documents what data_prep left out, so a failure to fetch it
    (a `pipe:` command cannot tell "absent" from "failed") leaves it out."""
    try:
        _write_atomic(root / SKIPPED_NAME, _fetch_bytes(url, SKIPPED_NAME, root))
    except RemoteShardError:
        (root / SKIPPED_NAME).unlink(missing_ok=True)


def _fetch_shards(url: str, root: Path, shards: list[_Listed]) -> None:
    """Fetch `shards` in parallel, each verified and renamed into `root`; the first failure stops the others."""
    if not shards:
        return
    from tqdm import tqdm

    stop = threading.Event()
    bar = tqdm(total=sum(shard.bytes for shard in shards), unit="B", unit_scale=True, desc="fetch shards",
               dynamic_ncols=True, file=sys.stderr)
    with bar, ThreadPoolExecutor(min(PARALLEL_FETCHES, len(shards))) as pool:
        progress = _Progress(bar, stop)
        futures = [pool.submit(_fetch_shard, url, root, shard, progress) for shard in shards]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [future.exception() for future in done if future.exception() is not None]
        finally:  # an error or Ctrl-C: queued fetches are dropped, running ones stop at their next chunk
            stop.set()
            pool.shutdown(cancel_futures=True)
    if errors:
        raise errors[0]


def _fetch_shard(url: str, root: Path, shard: _Listed, progress: _Progress) -> None:
    where = file_url(url, shard.name)
    tmp = _partial(root / shard.name)
    try:
        _fetch(where, tmp, progress)
        size, sha256 = tmp.stat().st_size, file_sha256(tmp)
        if (size, sha256) != (shard.bytes, shard.sha256):
            raise RemoteShardError(
                f"{where}: {MANIFEST_NAME} lists {shard.bytes} bytes with sha256 {shard.sha256}, fetched {size} bytes "
                f"with sha256 {sha256}: not the shard the manifest was written with")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, root / shard.name)
    finally:
        tmp.unlink(missing_ok=True)


class _Progress:
    """Counts fetched bytes into a shared bar (from several threads) and stops a fetch once `stop` is set."""

    def __init__(self, bar, stop: threading.Event) -> None:
        self.bar, self.stop, self.lock = bar, stop, threading.Lock()

    def add(self, count: int) -> None:
        if self.stop.is_set():
            raise RemoteShardError("fetch stopped")
        with self.lock:
            self.bar.update(count)


def _fetch(where: str, dest: Path, progress: _Progress | None = None) -> None:
    """Copy the file at URL `where` to the local path `dest`."""
    if where.startswith(PIPE):
        _run_pipe(where, dest, progress)
    else:
        _fetch_fsspec(where, dest, progress)


def _run_pipe(where: str, dest: Path, progress: _Progress | None) -> None:
    """Run the command of `pipe:COMMAND` in the shell, its stdout into `dest`; a non-zero exit is an error naming
    the last line the command wrote to stderr."""
    with open(dest, "wb") as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(where[len(PIPE):], shell=True, stdout=subprocess.PIPE, stderr=err)
        try:
            while chunk := process.stdout.read(CHUNK_BYTES):
                out.write(chunk)
                if progress is not None:
                    progress.add(len(chunk))
        except BaseException:
            process.kill()
            raise
        finally:
            process.stdout.close()
            status = process.wait()
        err.seek(0)
        lines = [line.strip() for line in err.read().decode(errors="replace").splitlines() if line.strip()]
    if status != 0:
        raise RemoteShardError(f"{where}: exit status {status}" + (f": {lines[-1]}" if lines else ""))


def _fetch_fsspec(where: str, dest: Path, progress: _Progress | None) -> None:
    import fsspec
    from fsspec.callbacks import Callback

    class _Callback(Callback):
        def call(self, *args, **kwargs) -> None:  # after each chunk (relative_update), on backends that report them
            if progress is not None:
                progress.add(self.value - reported[0])
                reported[0] = self.value

    reported = [0]
    try:
        fs, path = fsspec.core.url_to_fs(where, **_storage_options(where))
        fs.get_file(path, str(dest), callback=_Callback())
    except RemoteShardError:
        raise
    except FileNotFoundError as error:  # HTTP 404 too
        raise RemoteShardError(f"{where}: not found") from error
    except Exception as error:  # each backend has its own (aiohttp, botocore, a missing plugin's ImportError, ...)
        reason = (str(error).strip().splitlines() or [""])[0]
        raise RemoteShardError(f"{where}: {type(error).__name__}: {reason}") from error
    if progress is not None and reported[0] == 0:  # a backend that reports no chunks (a local copy)
        progress.add(dest.stat().st_size)


def _storage_options(where: str) -> dict:
    if where.split("://")[0].lower() not in ("http", "https"):
        return {}
    import aiohttp

    # aiohttp's default total timeout (5 min) would cut a large shard's download; keep connect and idle limits.
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)}}
