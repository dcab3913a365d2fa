"""The LightningModule of both training stages: a CED network trained on a loss of its logits and the batch.

Supervised training and distillation differ only in the batches (labels or stored teacher top-k) and the loss, so
one module serves both. Validation scores full-length labelled clips with the same code as the evaluate stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ced_train.data import ClipBatch
from ced_train.lightning.batches import DistillBatch, SupervisedBatch
from ced_train.metrics import tagging_metrics
from ced_train.models import CEDModel, describe_model
from ced_train.rendering import ViewRenderer

MONITOR = "val/mAP"


def clip_probabilities(model: CEDModel, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Probabilities of full-length clips: `(batch, samples)` zero-padded waveform and `(batch,)` true lengths →
    `(batch, classes)` float32.

    Clips of equal length run together; each clip sees only its own samples (no padding), chunked by the model
    like any long input. Logit-pooling models get a sigmoid, so every model yields probabilities.
    """
    probs = torch.empty(waveform.shape[0], model.num_classes, device=waveform.device)
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().squeeze(1)
        outputs = model(waveform[rows, :length]).float()
        probs[rows] = outputs.sigmoid() if model.pooling == "logit" else outputs
    return probs


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The global torch generator's seed for one training batch: 63 bits of blake2b over the four (any seed)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{batch}/{rank}".encode(), digest_size=8, person=b"ced-batch").digest()
    return int.from_bytes(digest, "little") >> 1


def gather_rows(module: pl.LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `(rows, ...)` tensors of every rank (rows may differ per rank) in rank order."""
    if module.trainer.world_size == 1:
        return tensor
    sizes = module.all_gather(torch.tensor(tensor.shape[0], device=tensor.device)).flatten().tolist()
    padded = F.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, max(sizes) - tensor.shape[0]))
    gathered = module.all_gather(padded)
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


def parameter_groups(model: nn.Module) -> list[dict]:
    """Weight-decayed matrices; biases, norms and the model's `no_weight_decay()` tables undecayed."""
    skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or name in skip else decay).append(parameter)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class TaggerModule(pl.LightningModule):
    """A CED tagger trained on `loss(logits, batch)`.

    Args:
        model: the network, `pooling="logit"`; kept as `self.model` so checkpoints hold `model.<official names>`.
        model_name: its registry name, recorded in checkpoints (`checkpoint["ced_model"]`).
        loss: `LabelBCE` for `SupervisedBatch`es, `TopKBCE` / `TopKKL` for `DistillBatch`es.
        optimizer: partial optimiser taking parameter groups.
        scheduler: partial `(optimizer, total_steps) -> LRScheduler`, stepped every optimiser step; None for none.
        seed: base of the per-batch seed of the global torch generator (dropout, drop-path), so that a run resumed
            from any checkpoint, mid-epoch too, draws what the uninterrupted run would have drawn.
        compile: run the training forward through `torch.compile`.
        head_bias_prior: when set, initialise the head's biases to `logit(head_bias_prior)`, the log-odds of a
            class being present (Lin et al. 2017, "Focal loss", section 4.1): one probability for every class or a
            `(num_classes,)` tensor of them (distillation: the store's mean teacher probabilities). With hundreds
            of classes that are mostly absent, a zero bias spends the first hundreds of steps pushing every class
            down before any class is told apart. Loaded weights (resume, fine-tuning) replace it.
    """

    def __init__(
        self,
        model: CEDModel,
        model_name: str,
        loss: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        seed: int = 0,
        compile: bool = False,
        head_bias_prior: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if model.pooling != "logit":
            raise ValueError(f"training needs a model with pooling='logit' (logits for the loss), got {model.pooling!r}")
        if head_bias_prior is not None:
            bias = model.outputlayer[-1].bias
            prior = None if isinstance(head_bias_prior, str) else torch.as_tensor(head_bias_prior, dtype=torch.float64)
            if prior is None or prior.shape not in ((), bias.shape) or not bool(((prior > 0) & (prior < 1)).all()):
                raise ValueError(f"head_bias_prior must be a probability in (0, 1) or {tuple(bias.shape)} of them, "
                                 f"got {head_bias_prior!r}")
            with torch.no_grad():
                bias.copy_(torch.logit(prior).to(bias.dtype).expand_as(bias))
        self.model = model
        self.model_name = model_name
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.compile = compile
        self.renderer = ViewRenderer()  # the batch's views, rendered on the training device
        self._train_forward: Callable[[torch.Tensor], torch.Tensor] = model.forward_spectrogram
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        # `{"epoch", "step", "mAP"}` of every validation run of the fit, kept in checkpoints so resumed runs keep it.
        self.val_history: list[dict] = []

    def setup(self, stage: str) -> None:
        # After the callbacks' setup, so that weight-averaging copies of the module hold no compiled function.
        if self.compile and stage == "fit":
            self._train_forward = torch.compile(self.model.forward_spectrogram)

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: SupervisedBatch | DistillBatch, batch_idx: int) -> None:
        torch.manual_seed(batch_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch: SupervisedBatch | DistillBatch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self._train_forward(self.renderer(batch.inputs)), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        if isinstance(batch, DistillBatch):  # the replay schedule: view epoch mod V
            self.log("train/view", batch.views.float().mean(), on_step=False, on_epoch=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: ClipBatch, batch_idx: int) -> None:
        real = ~batch.padding
        self._val_probs.append(clip_probabilities(self.model, batch.waveform[real], batch.lengths[real]))
        self._val_targets.append(batch.labels[real])

    def on_validation_epoch_end(self) -> None:
        num_classes = self.model.num_classes
        probs = torch.cat(self._val_probs) if self._val_probs else torch.empty(0, num_classes, device=self.device)
        targets = torch.cat(self._val_targets) if self._val_targets else torch.empty(0, num_classes, device=self.device)
        self._val_probs.clear()
        self._val_targets.clear()
        probs, targets = gather_rows(self, probs), gather_rows(self, targets)
        metrics = tagging_metrics(targets.cpu().numpy(), probs.cpu().numpy())
        # Every rank holds the same gathered set, so the values agree; sync_dist=True only avoids Lightning's warning.
        self.log(MONITOR, metrics.mAP, prog_bar=True, sync_dist=True)
        self.log("val/mAUC", metrics.mAUC, sync_dist=True)
        self.log("val/d_prime", metrics.d_prime, sync_dist=True)
        self.log("val/clips", float(metrics.num_clips), sync_dist=True)  # mAP depends on which clips were scored
        if not self.trainer.sanity_checking:
            self.val_history.append({"epoch": self.current_epoch, "step": self.global_step, "mAP": metrics.mAP})

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(parameter_groups(self.model))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_steps(self) -> int:
        """Optimiser steps of the whole run, from max_steps and max_epochs x the datamodule's `num_batches`.

        Not `trainer.estimated_stepping_batches`: it builds the training iterator before a resumed run has restored
        its epoch, and DataLoader workers would then start on the wrong epoch's views.
        """
        trainer = self.trainer
        steps = []
        if trainer.max_steps not in (None, -1):
            steps.append(trainer.max_steps)
        if trainer.max_epochs not in (None, -1):
            steps.append(trainer.max_epochs * math.ceil(trainer.datamodule.num_batches / trainer.accumulate_grad_batches))
        if not steps:
            raise ValueError("the learning-rate schedule needs a finite run: set max_epochs or max_steps")
        return min(steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ced_model"] = describe_model(self.model, self.model_name)
        checkpoint["ced_val_history"] = list(self.val_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = list(checkpoint.get("ced_val_history", []))
