"""Teacher pass vs plain batched inference of the same ensemble on the same clips, and bytes per (clip, view).

    python benchmarks/teacher_pass.py [--clips 48] [--views 2] [--teacher ced_tiny] [--batch-size 16] [--threads 1]

Both sides run the same two-teacher ensemble over every clip `views` times, read from the same shards:
- plain: decode each shard, pad/cut to 10 s, batched front end, ensemble, top-k, nothing kept (once per view);
- pass: `stages.teach.teacher_pass`: decode, batched front end of each batch's distinct clips and `apply` of its
  views on the device (`rendering.ViewRenderer`), ensemble, top-k, write parts, merge the store.
The figure is pass throughput / plain throughput (target >= 0.9), best of `--rounds` alternating rounds. Bytes per
(clip, view) are measured on the store written here and on a store of AS-20K's size (22,160 clips x 10 views,
synthetic values through the same writer and merge), target <= 100.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig, fixed_length
from ced_train.data import iter_shard, read_manifest
from ced_train.models import create_model
from ced_train.models.frontend import LogMelFrontEnd
from ced_train.stages.teach import teacher_pass
from ced_train.store import StoreSpec, merge_parts, write_part
from ced_train.teachers import load_ensemble


def synthetic_shards(root: Path, clips: int) -> Path:
    from ced_train.labels import load_class_labels
    from data_prep.audioset import AudioIndex, read_segments
    from data_prep.sharding import build_shards
    from data_prep.synthetic import generate

    generate(root / "raw", train=clips, eval_=0, seed=0, workers=1)
    classes = load_class_labels(root / "raw" / "class_labels_indices.csv")
    inputs = read_segments([root / "raw" / "balanced_train_segments.csv"],
                           AudioIndex(root / "raw" / "audio" / "balanced_train"), classes)
    build_shards(inputs, root / "shards", classes, tool="data_prep.audioset", labelled=True,
                 samples_per_shard=max(1, clips // 3), workers=1, progress=False)
    return root / "shards"


def plain_inference(shards: Path, ensemble, views: int, batch_size: int) -> float:
    """Seconds for `views` passes of batched inference over every clip (no augmentation, nothing kept)."""
    front_end = LogMelFrontEnd()
    manifest = read_manifest(shards)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(views):
            for shard in manifest.shards:
                waveforms = [fixed_length(clip.waveform, 160000) for clip in iter_shard(shard.path)]
                for i in range(0, len(waveforms), batch_size):
                    batch = torch.from_numpy(np.stack(waveforms[i : i + batch_size]))
                    ensemble(front_end(batch)).topk(20, dim=1)
    return time.perf_counter() - start


def teacher_store_seconds(shards: Path, store: Path, ensemble, views: int, batch_size: int) -> float:
    store.unlink(missing_ok=True)  # an up-to-date store would make the pass a no-op
    start = time.perf_counter()
    teacher_pass(shards, store, ensemble, AugmentConfig(), seed=0, num_views=views, batch_size=batch_size,
                 progress=False)
    return time.perf_counter() - start


def bytes_at_scale(root: Path, clips: int = 22160, views: int = 10, shards: int = 20) -> float:
    """File bytes per (clip, view) of a store of `clips` x `views`, written by the real writer and merge."""
    spec = StoreSpec("0" * 64, AugmentConfig(), 0, ({"file": "a.pt", "sha256": "0" * 64},) * 2, "probs", 20, views,
                     527)
    rng = np.random.default_rng(0)
    parts = []
    for index, count in enumerate(np.diff(np.linspace(0, clips, shards + 1).astype(int))):
        keys = [f"{''.join(rng.choice(list('abcdefghijkLMNOP-_0123'), 11))}_{rng.integers(0, 600) * 1000}"
                for _ in range(count)]
        values = np.sort(rng.random((views, count, 20)), axis=-1)[..., ::-1]
        indices = np.stack([np.stack([rng.permutation(527)[:20] for _ in range(count)]) for _ in range(views)])
        params = np.zeros((views, count), VIEW_PARAMS_DTYPE)
        parts.append(write_part(root / f"part{index}.h5", spec, f"shard-{index:06d}.tar", keys,
                                np.zeros(count, np.int32), params, values, indices))
    path = merge_parts(root / "scale.h5", spec, parts)
    return path.stat().st_size / (clips * views)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48, help="synthetic rows (a few are defective and skipped)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--teacher", default="ced_tiny", help="model variant of both (random) teachers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = synthetic_shards(root, args.clips)
        clips = read_manifest(shards).num_samples
        checkpoints = []
        for seed in range(2):
            torch.manual_seed(seed)
            checkpoints.append(root / f"teacher{seed}.pt")
            torch.save({"model": create_model(args.teacher).state_dict()}, checkpoints[-1])
        ensemble = load_ensemble(checkpoints)
        store = root / "store" / "bench.h5"
        plain_s, pass_s = [], []
        for _ in range(args.rounds):
            plain_s.append(plain_inference(shards, ensemble, args.views, args.batch_size))
            pass_s.append(teacher_store_seconds(shards, store, ensemble, args.views, args.batch_size))
        inputs = clips * args.views
        plain_rate, pass_rate = inputs / min(plain_s), inputs / min(pass_s)
        store_bytes = store.stat().st_size / inputs
        scale_bytes = bytes_at_scale(root)

    print(f"setup: {clips} synthetic clips x {args.views} views, 2 x {args.teacher} teachers, batch {args.batch_size}, "
          f"{args.threads} thread(s), CPU, best of {args.rounds}")
    print(f"plain batched inference  {plain_rate:8.2f} (clip, view)/s   ({', '.join(f'{s:.1f}' for s in plain_s)} s)")
    print(f"teacher pass (to store)  {pass_rate:8.2f} (clip, view)/s   ({', '.join(f'{s:.1f}' for s in pass_s)} s)")
    ratio = pass_rate / plain_rate
    print(f"throughput ratio pass/plain: {ratio:.3f}  (target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})")
    payload = 20 * 4 + VIEW_PARAMS_DTYPE.itemsize
    print(f"bytes per (clip, view): payload {payload}, file {store_bytes:.1f} here ({inputs} entries, HDF5 metadata "
          f"included), file {scale_bytes:.1f} at 22,160 clips x 10 views  (target <= 100: "
          f"{'met' if scale_bytes <= 100 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
