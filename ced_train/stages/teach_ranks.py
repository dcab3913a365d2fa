"""How the ranks of the teacher pass (`stages.teach`) work together: the device and process group, barriers,
decisions that rank 0 makes for all, the split of the unfinished shards, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch

from ced_train.stages import is_global_zero
from ced_train.store import StoreError

T = TypeVar("T")


def resolve_device(device: str) -> torch.device:
    """`teach.device`: "auto" is this rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout: timedelta) -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else from torchrun's environment (initialising one
    whose collectives fail after `timeout`)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    slurm_rank = int(os.environ.get("SLURM_PROCID", "0"))
    if "WORLD_SIZE" not in os.environ and slurm_tasks > 1 and slurm_rank > 0:
        # SLURM tasks alone form no process group: task 0 runs the pass by itself (python -m ced_train has the
        # others wait for it); were the others to run it too, they would race on the parts and the merge.
        raise RuntimeError(
            f"teacher pass: SLURM task {slurm_rank} of {slurm_tasks} without WORLD_SIZE/RANK: task 0 runs the pass "
            "alone (python -m ced_train makes the other tasks wait for it); to split it over GPUs start one torchrun "
            "per node (torchrun sets them)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    except RuntimeError as error:  # torch.distributed.DistError and backend errors
        raise RuntimeError(f"teach: the process group of WORLD_SIZE={os.environ['WORLD_SIZE']} ranks could not be "
                           f"formed (teach.timeout_min={timeout.total_seconds() / 60:g} bounds the wait for missing "
                           f"ranks): {error}") from error
    return dist.get_rank(), dist.get_world_size()


def is_rank_zero() -> bool:
    """Rank 0 of the caller's process group if there is one, else of the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return is_global_zero()


def barrier(world_size: int) -> None:
    if world_size > 1:
        try:
            torch.distributed.barrier()
        except RuntimeError as error:
            raise RuntimeError(f"teach: waiting for the other ranks failed: one of them stopped (its log says why) or "
                               f"did not arrive within teach.timeout_min ({error})") from error


def decided_by_rank_zero(rank: int, world_size: int, decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 and its result sent to every rank; a `StoreError` it raises is raised on every rank,
    with its message, rather than leaving the others to fail at the next barrier."""
    result, error = None, None
    if rank == 0:
        try:
            result = decide()
        except StoreError as raised:
            error = raised
    if world_size > 1:
        shared = [result, error]
        torch.distributed.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise error
    return result


def split_by_rows(rows: list[int], world_size: int) -> list[list[int]]:
    """The indices of `rows` (the chunk rows of each unfinished shard) that each rank runs: largest first, each to
    the rank with the fewest rows so far (then the fewest shards, then the lowest rank); a rank's in index order."""
    loads = [(0, 0)] * world_size
    taken: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        rank = min(range(world_size), key=lambda r: (*loads[r], r))
        loads[rank] = (loads[rank][0] + rows[index], loads[rank][1] + 1)
        taken[rank].append(index)
    return [sorted(indices) for indices in taken]


class Terminated(SystemExit):
    """SIGTERM arrived (a batch job's time limit, `scancel`): the pass stops with exit status 128 + 15."""


# Set by the SIGTERM handler: its raise can be swallowed where the signal lands (in a C callback, such as
# libsndfile's read callbacks into soundfile, Python only prints "Exception ignored"), so the pass checks it too.
_terminated = threading.Event()


def raise_if_terminated() -> None:
    """Raise `Terminated` if SIGTERM arrived during `stop_cleanly_on_sigterm`; call at safe points (every batch)."""
    if _terminated.is_set():
        raise Terminated(128 + signal.SIGTERM)


@contextmanager
def stop_cleanly_on_sigterm() -> Iterator[None]:
    """In the main thread, while SIGTERM has its default action (ending the process at once, so no `finally` block
    would run), make it raise `Terminated`: the store lock is released and temporary files are removed on the way
    out. The default action is restored afterwards; a handler installed by the caller is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame) -> None:
        _terminated.set()
        raise Terminated(128 + signum)

    _terminated.clear()
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
        raise_if_terminated()  # a raise the interrupted code swallowed, and no batch boundary came after it
    except Terminated:
        print("teach: stopped by SIGTERM; finished parts are kept and a new pass resumes from them", file=sys.stderr,
              flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
