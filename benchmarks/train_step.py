"""Student training throughput (clips per second, data loading included) in three set-ups, measured in one run:

  (r) CED: stored teacher targets + replayed augmentation (ViewsDataModule with a store, TopKBCE)
  (a) the same student trained on labels with fresh augmentation (no store, LabelBCE)  → ratio r / a, target >= 0.95
  (b) online distillation: fresh views, the teacher ensemble run on every batch           → speed-up r / b

All three use the same Lightning loop, student, batch size, clips and DataLoader settings; only where the targets
come from differs. Views are rendered inside the training step (front end and augmentation on the training device),
so every figure includes rendering. The dataset is data_prep.synthetic's, sharded; the store is written once by the teacher pass
(not timed: it is paid once, not every epoch). Teachers are randomly initialised (speed does not depend on weights).

    python benchmarks/train_step.py [--student ced_tiny] [--teachers ced_mini ced_mini] [--steps 20] [--batch 8]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ced_train.augment import AugmentConfig
from ced_train.labels import load_class_labels
from ced_train.lightning.batches import DistillBatch
from ced_train.lightning.data import ViewsDataModule
from ced_train.lightning.losses import LabelBCE, TopKBCE
from ced_train.lightning.module import TaggerModule
from ced_train.lightning.schedules import warmup_cosine
from ced_train.models import create_model
from ced_train.stages.teach import teacher_pass
from ced_train.teachers import TaggerTeacher, TeacherEnsemble
from data_prep.audioset import AudioIndex, read_segments
from data_prep.sharding import build_shards
from data_prep.synthetic import generate

TOP_K = 20


class StepTimer(Callback):
    """Wall time of training steps after `warmup` steps, data loading included."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.clips = 0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.clips += len(batch)
            self.elapsed = time.perf_counter() - self.start

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.elapsed


class OnlineDistillModule(TaggerModule):
    """Distillation without a store: the ensemble labels every (fresh) batch as it arrives."""

    def __init__(self, ensemble: TeacherEnsemble, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ensemble = ensemble.eval()

    def training_step(self, batch, batch_idx):
        mel_db = self.renderer(batch.inputs)
        with torch.no_grad():
            values, indices = self.ensemble(mel_db).topk(TOP_K, dim=1)
        targets = DistillBatch(batch.inputs, values, indices, torch.zeros(len(batch)), batch.keys)
        loss = self.loss(self._train_forward(mel_db), targets)
        self.log("train/loss", loss, batch_size=len(batch))
        return loss


def make_data(root: Path, clips: int) -> Path:
    generate(root / "raw", train=clips, eval_=0, seed=0, workers=2)
    classes = load_class_labels(root / "raw" / "class_labels_indices.csv")
    rows = read_segments([root / "raw" / "balanced_train_segments.csv"], AudioIndex(root / "raw" / "audio"), classes)
    build_shards(rows, root / "shards", classes, tool="data_prep.audioset", labelled=True, samples_per_shard=64,
                 workers=2, progress=False)
    return root / "shards"


def measure(label: str, module: TaggerModule, datamodule: ViewsDataModule, steps: int, warmup: int,
            accelerator: str) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(max_steps=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator=accelerator, devices=1, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    print(f"  {label:58s} {timer.clips_per_s:8.1f} clips/s  ({timer.clips} clips in {timer.elapsed:.1f} s)")
    return timer.clips_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="ced_tiny")
    parser.add_argument("--teachers", nargs="+", default=["ced_mini", "ced_mini"])
    parser.add_argument("--clips", type=int, default=96, help="synthetic training clips (10 s each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per set-up, after 3 untimed ones")
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    augment = AugmentConfig()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_data(root, args.clips)
        ensemble = TeacherEnsemble([TaggerTeacher(create_model(name)) for name in args.teachers])
        store = root / "store.h5"
        teacher_pass(shards, store, ensemble, augment, seed=0, num_views=2, top_k=TOP_K, batch_size=16,
                     progress=False)

        def student(loss, cls=TaggerModule, **extra):
            return cls(model=create_model(args.student, pooling="logit"), model_name=args.student, loss=loss,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
                       scheduler=functools.partial(warmup_cosine, warmup_steps=1), **extra)

        def data(**kwargs):
            return ViewsDataModule(str(shards), str(shards), batch_size=args.batch, eval_batch_size=args.batch,
                                   seed=0, **kwargs)

        print(f"student {args.student}, teachers {' + '.join(args.teachers)}, batch {args.batch}, "
              f"10 s clips, {args.steps} timed steps each")
        replay = measure("(r) stored targets + replayed augmentation (CED)", student(TopKBCE()),
                         data(store=str(store)), args.steps, 3, args.accelerator)
        labels = measure("(a) labels + fresh augmentation", student(LabelBCE()),
                         data(augment=augment, fresh_seed=1), args.steps, 3, args.accelerator)
        online = measure(f"(b) online distillation ({len(args.teachers)} teachers every step)",
                         student(TopKBCE(), OnlineDistillModule, ensemble=ensemble),
                         data(augment=augment, fresh_seed=1), args.steps, 3, args.accelerator)
    print(f"ratio r/a (replay vs labels; target >= 0.95): {replay / labels:.3f}")
    print(f"speed-up r/b (stored targets vs online teachers): {replay / online:.2f}x")


if __name__ == "__main__":
    main()
