"""The student's data path against the shard-decode ceiling, clips per second per core, measured in one run:

  decode   reading the shards alone: `iter_shard` (tar read + audio decode), one process
  replay   what distillation's DataLoader delivers: `EqualBatches` over `ViewDataset` replaying a teacher store with
           mixup (decode each clip to int16, its view parameters and stored top-k, the batch's distinct waveforms
           collated once: own clips and mixup partners), batches of `--batch`, with 0 workers (the main process) and
           with 2 workers. The front end and `apply` run on the training device inside the step
           (`rendering.ViewRenderer`), not here: see train_step.py and gpu_check.py

  epochs   the replay loader over `--epochs` epochs with 2 workers, whole epochs timed (start-up included): workers
           forked once for the fit (`persistent_workers=True`, what `ViewsDataModule` uses; each epoch only restarts
           their iterators, the epoch read from shared memory) against workers forked anew every epoch (before): clips/s
           of each epoch, FLAC

for both shard codecs (FLAC and PCM16 of the same clips: one fingerprint, so one store serves both), printed with the
ratio replay / decode per core (issue target: >= 0.9). Per core: with 0 workers the main process does all the work;
with W workers, the rate divided by W. Replay is timed from the arrival of its W-th batch (0 workers: the first) to
the end of the epoch, so worker start-up, paid once per epoch, is left out; the clips are cut to a multiple of the
batch, so the epoch delivers every clip it decodes. torch runs one thread per process, as in DataLoader workers. The
data is data_prep.synthetic's (10 s clips); the store is written once by the teacher pass of two random `ced_test`
teachers (not timed). All reads are from the page cache: this measures CPU cost, not disk.

    python benchmarks/loader.py [--clips 256] [--batch 16] [--epochs 4]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from data_throughput import best_rate  # benchmarks/ is sys.path[0] when this file runs as a script
from torch.utils.data import DataLoader

from ced_train.augment import AugmentConfig
from ced_train.data import iter_shard, read_manifest
from ced_train.labels import load_class_labels
from ced_train.lightning.data import EqualBatches, collate_distill
from ced_train.models import create_model
from ced_train.stages.teach import teacher_pass
from ced_train.teachers import TaggerTeacher, TeacherEnsemble
from ced_train.views import ViewDataset
from data_prep.audioset import AudioIndex, read_segments
from data_prep.sharding import SourceRow, build_shards
from data_prep.synthetic import generate

CODECS = ("flac", "pcm16")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers are joined when an epoch ends)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def replay_rates(loader: DataLoader, skip: int) -> tuple[float, float]:
    """(clips per second that `loader` delivers after its first `skip` batches have arrived, clips per CPU-second of
    the whole epoch in all processes, worker start-up included)."""
    clips, start, cpu_start, total = 0, None, cpu_seconds(), 0
    for index, batch in enumerate(loader):
        total += len(batch.keys)
        if index == skip - 1:
            start = time.perf_counter()
        elif start is not None:
            clips += len(batch.keys)
    elapsed = time.perf_counter() - start
    del loader  # joins the workers
    return clips / elapsed, total / (cpu_seconds() - cpu_start)


def epoch_rates(equal: EqualBatches, workers: int, persistent: bool, epochs: int) -> list[float]:
    """Clips/s of each of `epochs` whole epochs of one DataLoader (worker start-up included where it happens)."""
    loader = DataLoader(equal, batch_size=None, num_workers=workers, persistent_workers=persistent)
    rates = []
    for epoch in range(epochs):
        equal.set_epoch(epoch)  # as ViewsDataModule.set_epoch at the start of every epoch
        start = time.perf_counter()
        clips = sum(len(batch.keys) for batch in loader)
        rates.append(clips / (time.perf_counter() - start))
    del loader
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=256, help="synthetic training rows (10 s each; the defective ones "
                                                               "and a remainder of the batch are left out)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the persistent-workers comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)
    augment = AugmentConfig()
    assert augment.mixup_prob > 0, "the replay path is measured with mixup"

    with tempfile.TemporaryDirectory(prefix="ced_loader_") as tmp:
        root = Path(tmp)
        generate(root / "raw", train=args.clips, eval_=0, seed=0, workers=2)
        classes = load_class_labels(root / "raw" / "class_labels_indices.csv")
        rows = read_segments([root / "raw" / "balanced_train_segments.csv"], AudioIndex(root / "raw" / "audio"),
                             classes)
        build_shards(rows, root / "probe", classes, tool="data_prep.audioset", labelled=True, progress=False)
        decodable = {key for shard in read_manifest(root / "probe").shards for key in shard.keys}
        rows = [row for row in rows if isinstance(row, SourceRow) and row.key in decodable]
        rows = rows[: len(rows) - len(rows) % args.batch]
        shards = {}
        for codec in CODECS:
            shards[codec] = root / f"shards_{codec}"
            build_shards(rows, shards[codec], classes, tool="data_prep.audioset", labelled=True,
                         samples_per_shard=32, codec=codec, workers=2, progress=False)
        manifests = {codec: read_manifest(path) for codec, path in shards.items()}
        assert len({m.fingerprint for m in manifests.values()}) == 1
        store = root / "store.h5"
        ensemble = TeacherEnsemble([TaggerTeacher(create_model("ced_test")) for _ in range(2)])
        teacher_pass(shards["flac"], store, ensemble, augment, seed=0, num_views=2, batch_size=32, progress=False)

        clips = manifests["flac"].num_samples
        print(f"{clips} clips of 10 s in {len(manifests['flac'].shards)} shards, batch {args.batch}, mixup "
              f"p={augment.mixup_prob}, one torch thread per process; clips/s per core")
        results = {}
        for codec in CODECS:
            manifest = manifests[codec]
            size_mb = sum(shard.bytes for shard in manifest.shards) / 1e6
            decode = best_rate(lambda m=manifest: sum(1 for s in m.shards for _ in iter_shard(s.path)))
            dataset = ViewDataset(shards[codec], store=store, shuffle=True, seed=0)
            equal = EqualBatches(dataset, args.batch, 0, 1, collate_distill)
            replay, per_cpu_s = {}, {}
            for workers in (0, 2):
                runs = [replay_rates(DataLoader(equal, batch_size=None, num_workers=workers), max(workers, 1))
                        for _ in range(3)]
                replay[workers] = max(wall for wall, _ in runs) / max(workers, 1)
                per_cpu_s[workers] = max(cpu for _, cpu in runs)
            results[codec] = (decode, replay)
            print(f"  {codec:6s} ({size_mb:6.1f} MB)  decode {decode:8.1f}   replay, 0 workers {replay[0]:7.1f} "
                  f"({replay[0] / decode:.2f} x decode)   replay, 2 workers {replay[2]:7.1f} "
                  f"({replay[2] / decode:.2f} x decode; {per_cpu_s[2]:.1f} clips per CPU-second of workers and "
                  "main process, start-up included)")
        equal = EqualBatches(ViewDataset(shards["flac"], store=store, shuffle=True, seed=0), args.batch, 0, 1,
                             collate_distill)
        persistent = epoch_rates(equal, 2, True, args.epochs)
        forked = epoch_rates(equal, 2, False, args.epochs)
        print(f"  epochs, 2 workers, flac: clips/s of each whole epoch (start-up included)")
        print(f"    persistent workers       {'  '.join(f'{rate:7.1f}' for rate in persistent)}")
        print(f"    workers forked per epoch {'  '.join(f'{rate:7.1f}' for rate in forked)}")
    flac, pcm = results["flac"], results["pcm16"]
    print(f"ratio decode pcm16 / flac: {pcm[0] / flac[0]:.2f}")
    print(f"ratio replay pcm16 / flac (0 workers): {pcm[1][0] / flac[1][0]:.2f}")
    print(f"ratio replay / decode ceiling (flac, 0 workers; target >= 0.9): {flac[1][0] / flac[0]:.2f}")
    later = slice(1, None)  # epochs after the first, where persistent workers are already up
    print(f"ratio persistent / forked per epoch, epochs 2-{args.epochs}: "
          f"{sum(persistent[later]) / sum(forked[later]):.2f}; persistent epoch {args.epochs} / epoch 2: "
          f"{persistent[-1] / persistent[1]:.2f}")


if __name__ == "__main__":
    main()
