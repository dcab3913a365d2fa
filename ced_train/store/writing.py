"""Writing a store: one part file per shard, the merge of the parts into the store, and the lock that lets one
teacher pass at a time write them. Every file is written under a temporary name, fsynced and renamed, so a file
that exists is complete."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ced_train.store.format import (
    INDEX_DTYPE,
    VALUE_DTYPE,
    StoreError,
    StoreSpec,
    create_layout,
    open_for_reading,
)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write; fsynced and renamed to `path` when the block ends, removed when it
    raises (a full disk leaves no partial file)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except RuntimeError as error:  # HDF5 reports a failed write (a full disk) as a RuntimeError, often on close
        tmp.unlink(missing_ok=True)
        failed = re.search(r"errno = (\d+), error message = '([^']*)'", str(error))
        if failed is None:
            raise
        raise OSError(int(failed[1]), f"{failed[2]} (writing {path})") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_part(
    path: str | Path,
    spec: StoreSpec,
    shard_name: str,
    keys: list[str],
    chunks: np.ndarray,
    view_params: np.ndarray,
    topk_values: np.ndarray,
    topk_indices: np.ndarray,
) -> Path:
    """Write the complete result for one shard (all views) atomically: temporary name, fsync, rename.

    Args:
        keys, chunks: sample key and chunk index of each of the shard's `n` rows (`data.chunks.ShardChunks`).
        view_params: `(views, n)` `VIEW_PARAMS_DTYPE`.
        topk_values: `(views, n, k)` probabilities (stored as float16); topk_indices: `(views, n, k)` class indices.
    """
    path = Path(path)
    expected = (spec.num_views, len(keys))
    for name, array, shape in (
        ("view_params", view_params, expected),
        ("topk_values", topk_values, expected + (spec.top_k,)),
        ("topk_indices", topk_indices, expected + (spec.top_k,)),
    ):
        if array.shape != shape:
            raise ValueError(f"part {shard_name}: {name} has shape {array.shape}, expected {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as file:
        create_layout(file, spec, keys, chunks, [shard_name], [0, len(keys)])
        file["view_params"][...] = view_params
        file["topk_values"][...] = topk_values.astype(VALUE_DTYPE)
        file["topk_indices"][...] = topk_indices.astype(INDEX_DTYPE)
    return path


def part_is_complete(path: str | Path, spec: StoreSpec, shard_name: str, num_rows: int) -> bool:
    """True if `path` is a finished part of this spec for this shard.

    Raises:
        StoreError: the part exists but was made from something else (a different spec, shard or row count);
            it is never silently replaced.
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        with open_for_reading(path) as file:
            found = StoreSpec.from_attrs(file.attrs)
            names = [name.decode() for name in file["shard_names"][:]]
            rows = int(file.attrs["num_rows"])
    except (OSError, KeyError) as error:
        raise StoreError(f"part {path} is unreadable ({error}); delete it to redo shard {shard_name}") from error
    if found.fingerprint() != spec.fingerprint():
        raise StoreError(
            f"part {path} was written for another pass (fingerprint {found.fingerprint()}, this pass "
            f"{spec.fingerprint()}): {'; '.join(found.differences(spec))}. Delete it (or all of {path.parent}), or "
            "let the pass replace it (teach.overwrite=true)."
        )
    if names != [shard_name] or rows != num_rows:
        raise StoreError(f"part {path} holds {names} with {rows} rows, expected {shard_name} with {num_rows}")
    return True


def merge_parts(path: str | Path, spec: StoreSpec, parts: list[str | Path]) -> Path:
    """Concatenate part files (in the given order: the manifest's shard order) into the store at `path`, atomically.

    Every part must carry `spec`'s fingerprint.
    """
    path = Path(path)
    headers = []
    for part in parts:
        with open_for_reading(part) as file:
            if file.attrs["fingerprint"] != spec.fingerprint():
                raise StoreError(f"part {part} has fingerprint {file.attrs['fingerprint']}, expected "
                                 f"{spec.fingerprint()}")
            headers.append(([key.decode() for key in file["keys"][:]], file["chunks"][:],
                            file["shard_names"][0].decode()))
    keys = [key for part_keys, _, _ in headers for key in part_keys]
    chunks = np.concatenate([part_chunks for _, part_chunks, _ in headers]) if headers else np.zeros(0, np.int32)
    offsets = np.cumsum([0] + [len(part_keys) for part_keys, _, _ in headers]).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as out:
        create_layout(out, spec, keys, chunks, [name for _, _, name in headers], offsets)
        for part, start, stop in zip(parts, offsets[:-1], offsets[1:]):
            with open_for_reading(part) as file:
                for name in ("topk_values", "topk_indices", "view_params"):
                    out[name][:, start:stop] = file[name][...]
    return path


class StoreLockedError(StoreError):
    """Another teacher pass holds the store's lock."""


class StoreLock:
    """The lock file `<store>.lock` of the one pass that writes a store's parts and merges them.

    It is created with `O_CREAT | O_EXCL`, which is atomic on local file systems, NFS and Lustre, where advisory
    locks (flock, fcntl) are often unavailable or not seen across nodes. It holds the holder as JSON: host, pid, pid
    namespace, start time and a random token. A lock whose holder ran in this host's process space and is gone (a
    killed pass) is removed by the next pass; any other lock stays until its file is deleted or a pass is started with
    `break_lock=True` (`teach.break_lock=true`). Of several passes that remove the same stale lock at once, one takes
    the lock (`_remove_stale`).
    """

    def __init__(self, path: Path, holder: dict) -> None:
        self.path = path
        self.holder = holder

    @staticmethod
    def path_of(store_path: str | Path) -> Path:
        store_path = Path(store_path)
        return store_path.with_name(store_path.name + ".lock")

    @classmethod
    def acquire(cls, store_path: str | Path, break_lock: bool = False) -> "StoreLock":
        """Take the lock of the store at `store_path`.

        Raises:
            StoreLockedError: another pass holds it (the message names the holder and how to break a stale lock).
        """
        path = cls.path_of(store_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The token tells this acquisition from a later one of the same process (see `release`).
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}
        try:
            return cls._create(path, holder)
        except FileExistsError:
            stale = _read_lock(path)
        if stale is not None:  # (None: released in between)
            found = _holder_of(stale)
            if not (break_lock or _holder_is_gone(found)):
                raise StoreLockedError(_locked_message(store_path, path, found))
            reason = "teach.break_lock=true" if break_lock else "its process is gone"
            print(f"store: removing the lock {path} of {_describe(found)} ({reason})", flush=True)
            _remove_stale(store_path, path, stale)
        try:
            return cls._create(path, holder)
        except FileExistsError:  # another pass took it in between
            raise StoreLockedError(_locked_message(store_path, path, _read_holder(path))) from None

    @classmethod
    def _create(cls, path: Path, holder: dict) -> "StoreLock":
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(holder, handle)
        except BaseException:  # a full disk: an empty lock file would block every later pass
            path.unlink(missing_ok=True)
            raise
        return cls(path, holder)

    def release(self) -> None:
        """Remove the lock file, unless it is no longer this pass's (broken and taken by another pass)."""
        if _read_holder(self.path) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), so that a pid is only judged in the namespace it belongs to."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _remove_stale(store_path: str | Path, path: Path, stale: bytes) -> None:
    """Remove the lock file `path` if it still holds `stale`.

    Passes that found the same stale lock race here, and an unlink of what they found could remove a lock that one
    of them has taken since (so could a rename of it aside and back). So each first creates the claim file
    `<lock>.break-<digest of stale>` (`O_EXCL`, atomic on NFS and Lustre too); the one that creates it re-reads the
    lock and removes it only if unchanged. Meanwhile no other pass can remove the stale lock, and its holder is gone
    (or `break_lock` vouches that it is not running), so what it removes is the stale lock. The others are refused;
    the `O_EXCL` create that follows gives the lock to one pass.

    Raises:
        StoreLockedError: another pass is removing this stale lock.
    """
    claim = path.with_name(f"{path.name}.break-{hashlib.sha256(stale).hexdigest()[:16]}")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise StoreLockedError(f"{store_path}: another teacher pass is removing its stale lock {path} (claim file "
                               f"{claim}); if no pass is running, delete both files") from None
    try:
        if _read_lock(path) == stale:
            path.unlink()
    finally:
        claim.unlink()


def _read_lock(path: Path) -> bytes | None:
    """The lock file's content; None when it is gone or unreadable."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _holder_of(content: bytes | None) -> dict | None:
    """The holder recorded in a lock file's content; None when it is missing, empty (being written) or not JSON."""
    try:
        holder = json.loads(content)
    except (TypeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _read_holder(path: Path) -> dict | None:
    return _holder_of(_read_lock(path))


def _holder_is_gone(holder: dict | None) -> bool:
    """True only for a holder of this host and pid namespace whose process no longer exists."""
    if holder is None or (holder.get("host"), holder.get("pid_namespace")) != (socket.gethostname(), _pid_namespace()):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False  # alive under another user, or a holder without a usable pid
    return False


def _locked_message(store_path: str | Path, path: Path, holder: dict | None) -> str:
    return (f"{store_path} is being written by another teacher pass ({_describe(holder)}; lock file {path}); if that "
            f"pass is no longer running, delete {path} or set teach.break_lock=true")


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "holder unknown: the lock file is empty or unreadable"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
