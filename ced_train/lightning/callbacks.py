"""Callbacks of the training stages."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from torch import nn

log = logging.getLogger(__name__)

_PREFIX = "model."
# Under DDP, optimiser steps between the ranks' checks for a save-on-signal (each check waits for the device).
SIGNAL_CHECK_STEPS = 10


def average_checkpoints(paths: list[str | Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the `model.*` weights of Lightning checkpoints → state dict with official names.

    Floating tensors are averaged (in float64, then cast back); integer buffers (BatchNorm's batch counters) are
    taken from the first checkpoint. Holds one checkpoint and the running sum in memory at a time.
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    totals: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for path in paths:
        # This run's own checkpoints: plain tensors and containers, so the safe loader reads them.
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        weights = {key[len(_PREFIX) :]: value for key, value in state.items() if key.startswith(_PREFIX)}
        if not first:
            first = weights
        elif weights.keys() != first.keys():
            raise ValueError(f"{path}: its tensors differ from those of {paths[0]}; cannot average")
        for key, value in weights.items():
            if value.is_floating_point():
                totals[key] = totals.get(key, 0) + value.double()
    return {
        key: (totals[key] / len(paths)).to(value.dtype) if key in totals else value for key, value in first.items()
    }


class AverageBestCheckpoints(Callback):
    """The paper's finish: at the end of fit, load into `pl_module.model` the average of the weights of the best
    `num_best` checkpoints kept by the run's `ModelCheckpoint` (by its monitor, e.g. val/mAP).

    `sources` then lists the averaged `(path, score)` pairs, best first. Set the ModelCheckpoint's `save_top_k` to
    at least `num_best`. Without any scored checkpoint (no validation ran) the weights are left as they are.
    """

    def __init__(self, num_best: int = 4) -> None:
        if num_best < 1:
            raise ValueError(f"num_best must be at least 1, got {num_best}")
        self.num_best = num_best
        self.sources: list[tuple[str, float]] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or not checkpoint.best_k_models:
            log.warning("no scored checkpoint to average: keeping the final weights")
            return
        reverse = checkpoint.mode == "max"
        ranked = sorted(checkpoint.best_k_models.items(), key=lambda item: float(item[1]), reverse=reverse)
        self.sources = [(str(path), float(score)) for path, score in ranked[: self.num_best]]
        trainer.strategy.barrier("average_best_checkpoints")
        weights = average_checkpoints([path for path, _ in self.sources])
        pl_module.model.load_state_dict(weights)
        log.info(
            "averaged the best %d checkpoints by %s: %s",
            len(self.sources),
            checkpoint.monitor,
            ", ".join(f"{Path(path).name} ({score:.4f})" for path, score in self.sources),
        )


class LastCheckpoint(Checkpoint):
    """Writes `dirpath/last.ckpt`, the checkpoint `resume=auto` continues from: at the end of every epoch, after
    every validation inside an epoch and every `every_n_train_steps` optimiser steps, whatever the score. A crash
    loses at most that much work, and the resumed run continues exactly, mid-epoch too. (ModelCheckpoint's
    `save_last` only writes along with a new top-k checkpoint, so its `last.ckpt` may lie far behind.) A Checkpoint
    callback, so Lightning runs it after the others (early stopping's state is saved current). Mid-epoch saves happen
    only right after an optimiser step, never with accumulated gradients pending. Written atomically: a run killed
    while saving keeps the previous file.

    On `save_on_signal` (SIGUSR2: what submitit, and `sbatch --signal=USR2@<s>`, send before a job's time limit) it
    also writes last.ckpt after the current step (or at the end of the epoch, when that step ends one), then passes
    the signal on to the handler it replaced (submitit's requeues the job) and exits.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None,
                 save_on_signal: str | None = "SIGUSR2") -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1 or null, got {every_n_train_steps}")
        if save_on_signal is not None and not isinstance(getattr(signal, str(save_on_signal), None), signal.Signals):
            raise ValueError(f"save_on_signal={save_on_signal!r}: expected a signal name such as SIGUSR2, or null")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.save_on_signal = getattr(signal, save_on_signal) if save_on_signal else None
        self._saved_step = -1
        self._step_at_batch_start = -1
        self._stepped = False  # the last training batch ended with an optimiser step (no gradients pending)
        self._signalled = False
        self._stop_at_epoch_end = False
        self._previous_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_signal is None:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("last.ckpt: not in the main thread, so no checkpoint on %s", self.save_on_signal.name)
            return
        self._previous_handler = signal.signal(self.save_on_signal, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signalled = True  # acted on at the end of the batch, where the state is whole

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(self.save_on_signal, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # With gradient accumulation, a batch that did not step leaves gradients that a checkpoint would lose.
        self._stepped = trainer.global_step != self._step_at_batch_start
        if self._stepped and self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer, mid_epoch_only=True)
        if self._stepped and self._signal_agreed(trainer):
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                self._stop_at_epoch_end = True
            else:
                self._save_and_stop(trainer)

    def _signal_agreed(self, trainer: pl.Trainer) -> bool:
        """Whether a rank got the signal. Ranks agree every `SIGNAL_CHECK_STEPS` steps (one small all-reduce, which
        waits for the device), so that all of them save at the same step."""
        if self.save_on_signal is None:
            return False
        if trainer.world_size == 1:
            return self._signalled
        if trainer.global_step % SIGNAL_CHECK_STEPS:
            return False
        return trainer.strategy.reduce_boolean_decision(self._signalled, all=False)

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt (after a step inside an epoch, or at an epoch's end), then hand the signal to the handler it
        would have reached without this callback (submitit's: requeue the job, which resumes with resume=auto)."""
        self._save(trainer, mid_epoch_only=False)
        log.warning("%s: wrote %s at step %d", self.save_on_signal.name, self.path, trainer.global_step)
        previous = self._previous_handler
        self._restore_handler()
        if callable(previous):
            previous(self.save_on_signal, None)
        raise SystemExit(f"stopped by {self.save_on_signal.name} after step {trainer.global_step}, saved in "
                         f"{self.path}: continue with resume=auto")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._stepped:
            self._save(trainer, mid_epoch_only=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, mid_epoch_only=False)
        if self._stop_at_epoch_end:
            self._save_and_stop(trainer)

    def _save(self, trainer: pl.Trainer, mid_epoch_only: bool) -> None:
        # At an epoch's last batch, only the end of the epoch is a clean place to resume from.
        if mid_epoch_only and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        if trainer.global_step == self._saved_step:  # a validation right after a step-count save
            return
        self._saved_step = trainer.global_step
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)  # every rank takes part; global rank 0 writes
        if trainer.is_global_zero:
            partial.replace(self.path)


class BatchNormCumulativeStart(Callback):
    """BatchNorm running statistics that are the plain mean of the batches seen so far while a run is young, then
    each layer's own exponential average.

    A BatchNorm of momentum m still weights its initial statistics (mean 0, variance 1) by (1 - m)^t after t
    batches: at CED's mel BatchNorm (m = 0.01) 37 % after 100 batches, so early validations, and the checkpoint
    choice and early stopping built on them, see inputs shifted by most of a standard deviation. Here batch t of a
    layer (counted from its `num_batches_tracked`) updates with momentum max(m, 1 / (t + 1)): the cumulative mean
    for the first 1/m batches, m afterwards. Only the update weights change, never the layer: a finished model is
    the same BatchNorm model, and a loaded one that has seen batches goes on from its counter. The counters are
    read once when training starts (no device synchronisation per step); the momenta are restored at its end.
    """

    def __init__(self) -> None:
        self._layers: list[tuple[nn.modules.batchnorm._BatchNorm, float, int]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = [
            (layer, layer.momentum, int(layer.num_batches_tracked))
            for layer in pl_module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
            and layer.momentum is not None
        ]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        for i, (layer, momentum, seen) in enumerate(self._layers):
            layer.momentum = max(momentum, 1.0 / (seen + 1))
            self._layers[i] = (layer, momentum, seen + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer, momentum, _ in self._layers:
            layer.momentum = momentum
