"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from ced_train.audio import SAMPLE_RATE

# The environment variables the project's configuration reads (configs/paths/default.yaml).
ENV_VARS = ("AUDIOSET_DIR", "CED_CHECKPOINTS_DIR", "CED_DATA_DIR", "CED_RUNS_DIR", "CED_ROOT")


def app_env(root: Path) -> dict[str, str]:
    """The caller's environment without the project's variables, rooted at `root`, wandb silent: for running
    `python -m ced_train` in a subprocess whose paths all lie below `root`."""
    environ = {key: value for key, value in os.environ.items() if key not in ENV_VARS}
    return {**environ, "CED_ROOT": str(root), "WANDB_SILENT": "true"}


def newest_write(root: Path) -> float:
    """The latest modification time (s) of a file below `root`; files that vanish while it looks are passed over."""
    newest = 0.0
    for entry in root.rglob("*"):
        try:
            newest = max(newest, entry.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest


def run_until_stalled(command: list[str], cwd: Path, env: dict[str, str], watch: Path,
                      stall_s: float = 300.0) -> subprocess.CompletedProcess:
    """Run `command` to its end however long a loaded machine makes it, but kill it once it stops making progress:
    no new output and no file below `watch` written for `stall_s` seconds (a hang, not slowness). Returns the
    completed process with its output as text; a stalled one raises TimeoutError naming the command and its tail."""
    def progress() -> tuple:
        return os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size, newest_write(watch)

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        marker, moved = progress(), time.monotonic()
        while process.poll() is None:
            time.sleep(min(2.0, stall_s / 4))
            now = progress()
            if now != marker:
                marker, moved = now, time.monotonic()
            elif time.monotonic() - moved > stall_s:
                process.kill()
                process.wait()
                err.seek(0)
                raise TimeoutError(f"no output and no file written below {watch} for {stall_s:.0f} s: killed "
                                   f"{' '.join(command)}\n{err.read()[-3000:]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


def spawn_bounded(fn, args: tuple, nprocs: int, timeout_s: float = 180.0) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)` that cannot hang: processes still running after `timeout_s`
    are killed and the call raises TimeoutError (a worker's exception is re-raised as spawn does)."""
    import torch

    context = torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
            raise TimeoutError(f"{getattr(fn, '__name__', fn)}: {nprocs} spawned processes still running after "
                               f"{timeout_s:.0f} s: killed")


def make_shards(out_dir: Path, durations_s: list[float], samples_per_shard: int, seed: int = 0) -> Path:
    """Write one clip per duration (noise bursts, clip `i` labelled with class `i`) as a shard directory through
    data_prep's writer; return it. A duration of 0 writes an empty WAV, which data_prep skips as `empty`."""
    from ced_train.labels import load_class_labels
    from data_prep.sharding import SourceRow, build_shards

    classes = load_class_labels()
    audio_dir = out_dir.parent / f"{out_dir.name}_audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, seconds in enumerate(durations_s):
        samples = int(seconds * SAMPLE_RATE)
        envelope = np.repeat(rng.uniform(0.01, 0.5, size=max(1, samples // 1600 + 1)), 1600)[:samples]
        waveform = (rng.standard_normal(samples) * envelope).astype(np.float32)
        path = audio_dir / f"clip{i:03d}.wav"
        soundfile.write(path, waveform, SAMPLE_RATE, subtype="PCM_16")
        label = i % len(classes)
        rows.append(SourceRow(f"clip{i:03d}", f"clip{i:03d}", path, path.name, (label,), (classes.mids[label],)))
    build_shards(rows, out_dir, classes, tool="test", labelled=True, samples_per_shard=samples_per_shard,
                 workers=1, seed=seed, progress=False)
    return out_dir


class KillAtStep:
    """A Lightning callback (`+callbacks.kill._target_=helpers.KillAtStep +callbacks.kill.step=N`) that SIGKILLs its
    own process when batch N + 1 is about to train, i.e. after step N's checkpoints were written: a crash, not a
    shutdown (nothing is flushed or saved)."""

    def __new__(cls, step: int):
        import os
        import signal

        from lightning.pytorch.callbacks import Callback

        class _Kill(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if trainer.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


class SaveRankWeights:
    """A Lightning callback (`+callbacks.weights._target_=helpers.SaveRankWeights +callbacks.weights.dirpath=D`)
    that saves, as `D/rank<global rank>.pt` when training ends, every rank's model weights (`weights`) and the keys
    of the training clips it saw, by epoch (`keys`)."""

    def __new__(cls, dirpath: str):
        from pathlib import Path

        import torch
        from lightning.pytorch.callbacks import Callback

        class _Save(Callback):
            def __init__(self) -> None:
                self.keys: dict[int, list[str]] = {}

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self.keys.setdefault(trainer.current_epoch, []).extend(batch.keys)

            def on_train_end(self, trainer, pl_module) -> None:
                Path(dirpath).mkdir(parents=True, exist_ok=True)
                torch.save({"weights": pl_module.model.state_dict(), "keys": self.keys},
                           Path(dirpath) / f"rank{trainer.global_rank}.pt")

        return _Save()


class RecordLastCheckpoints:
    """A Lightning callback (`+callbacks.record._target_=helpers.RecordLastCheckpoints +callbacks.record.out=F`) that,
    before every training batch and at the end, appends to JSON-lines file `F` the batch counters of `last.ckpt`
    whenever that file changed: what a resumed run would start from."""

    def __new__(cls, out: str):
        import json
        from pathlib import Path

        import torch
        from lightning.pytorch.callbacks import Callback

        class _Record(Callback):
            seen = None

            def _record(self, trainer) -> None:
                path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
                if not path.is_file() or path.stat().st_mtime_ns == self.seen:
                    return
                self.seen = path.stat().st_mtime_ns
                loops = torch.load(path, weights_only=False)["loops"]["fit_loop"]
                progress = loops["epoch_loop.batch_progress"]["current"]["processed"]
                with open(out, "a") as handle:
                    handle.write(json.dumps({"batches_done_in_epoch": progress}) + "\n")

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self._record(trainer)

            def on_train_end(self, trainer, pl_module) -> None:
                self._record(trainer)

        return _Record()


class HashTeacher:
    """A teacher whose top-20 classes are a hash of the exact input bits: equal top-k ⇔ (practically) equal input."""

    num_classes = 527

    def __call__(self, mel_db: torch.Tensor) -> torch.Tensor:
        logits = torch.full((mel_db.shape[0], self.num_classes), -30.0)
        for i, row in enumerate(mel_db.float().cpu()):
            digest = hashlib.sha256(row.contiguous().numpy().tobytes()).digest()
            classes = np.random.default_rng(list(digest)).permutation(self.num_classes)[:20]
            logits[i, torch.from_numpy(classes)] = torch.linspace(3.0, -2.0, 20)
        return logits


class RecordTrainingBatches:
    """A Lightning callback (`+callbacks.record._target_=helpers.RecordTrainingBatches +callbacks.record.out=F`) that
    appends to JSON-lines file `F`, for every training batch, its epoch, keys and store views and the process ids of
    the training DataLoader's workers (empty without workers)."""

    def __new__(cls, out: str):
        import json

        from lightning.pytorch.callbacks import Callback

        class _Record(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                iterator = getattr(trainer.fit_loop._combined_loader.flattened[0], "_iterator", None)
                pids = sorted(worker.pid for worker in getattr(iterator, "_workers", []))
                with open(out, "a") as handle:
                    handle.write(json.dumps({"epoch": trainer.current_epoch, "keys": batch.keys,
                                             "views": batch.views.tolist(), "worker_pids": pids}) + "\n")

        return _Record()


class WaitAtStep:
    """A Lightning callback (`+callbacks.wait._target_=helpers.WaitAtStep +callbacks.wait.step=N
    +callbacks.wait.marker=M`) that, once per marker, before batch N + 1 writes its process id to `M` and waits
    (at most 120 s) until the file `M.go` exists: time for a test to signal this very process mid-training."""

    def __new__(cls, step: int, marker: str):
        import os
        import time
        from pathlib import Path

        from lightning.pytorch.callbacks import Callback

        class _Wait(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                path = Path(marker)
                if trainer.global_step != step or path.exists():
                    return
                path.write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not path.with_name(path.name + ".go").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

        return _Wait()


class AppJob:
    """A submitit job that runs the app's stages for `overrides` and returns their results; `checkpoint` resubmits
    it unchanged, as hydra-submitit-launcher does with a Hydra job (the requeued run finds its outputs again)."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = overrides

    def __call__(self) -> dict:
        from ced_train.__main__ import compose, run_stages

        return run_stages(compose(self.overrides))[0]

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)
