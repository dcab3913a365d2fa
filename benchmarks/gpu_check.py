"""Throughput of the whole CED path on one accelerator, figures and ratios measured in one run (docs/performance.md):

  teach     the teacher pass (`stages.teach.teacher_pass`) of 2 x CED-Base over synthetic shards, which writes the
            store the student replays, against the bare ensemble forward on a batch already on the device
  render    views of that store rendered on the device (`rendering.ViewRenderer`: front end + `apply`, batched):
            views/s, and the checks that they agree with the CPU's rendering, and across batch sizes on the device
            (kernels are chosen by shape), within a bound on float32 rounding at each cell's level below its clip's
            peak (`render_tolerance_db`), itself checked on the CPU against a second float32 front end (direct DFT)
  distill   the CED-Tiny student's Lightning fit on `ViewsDataModule` replaying that store (shards -> ViewDataset ->
            DataLoader workers -> training step + AdamW), and the same fit on a few of its batches cached on the
            device (no data path), under bf16 and fp16 autocast, torch.compile off and on; on a single GPU also
            `device_syncs`, the implicit device synchronisations of the timed steps (torch's sync debug mode): a
            step that never waits for the device has none but the progress bar's and logger's reads
  evaluate  the evaluate stage (`stages.evaluate.run`, on the app's own composed config) on a checkpoint of that
            student, against the bare `clip_probabilities` on a batch on the device
  ddp       the bf16 data-path fit over every visible GPU, in a child process (Lightning re-runs it per rank);
            skipped with one GPU

Every timed fit and forward runs `--seconds` after its warm-up (compilation included there). A data-path fit's
warm-up also covers the batches its DataLoader workers render ahead while they start (timed, that queue would cost
nothing), and its timing ends with the first epoch at the latest (the next epoch restarts the workers' iterators),
so the epoch must be long: the shards hold `--clips` rows that repeat `--distinct` generated clips (each row is
decoded on its own, so the data path does the work of distinct clips, for a fraction of the generation time).

The run fits a device lease: a step whose estimated cost (`COST_S`, `DATA_S_PER_CLIP_CORE`, `TEACH_VIEWS_PER_S`)
would end past `--budget` seconds is skipped with a printed line (if that is making the data or the teacher pass,
everything after it is skipped too), a fit still warming up (compiling) at the budget stops there, and the
measurements run in order of interest (bf16 eager, evaluate, ddp, compile, fp16). The JSON (`--out`) is rewritten
after every figure, and once more when a section fails or the run is stopped (SIGTERM, as from `timeout`; while
the data is made, SIGTERM ends the run at once), with what was measured. Exit status: 0, or 1 if a measurement
failed or a check was missed, 128 + the signal if stopped.
The data is data_prep.synthetic's, sharded by data_prep; teachers and student are randomly initialised (speed only).

    python benchmarks/gpu_check.py [--out FILE] [--seconds 5] [--clips 16384] [--distinct 2048] [--budget 220]
    python benchmarks/gpu_check.py --device cpu --quick       # smoke test: small teachers, a few clips
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader
from train_step import StepTimer  # benchmarks/ is sys.path[0] when this file runs as a script

from ced_train.__main__ import compose
from ced_train.augment import AugmentConfig, apply
from ced_train.data import read_manifest
from ced_train.labels import load_class_labels
from ced_train.lightning.data import ViewsDataModule
from ced_train.lightning.losses import TopKBCE
from ced_train.lightning.module import TaggerModule, clip_probabilities
from ced_train.lightning.schedules import warmup_cosine
from ced_train.models import create_model, load_checkpoint
from ced_train.rendering import PCM_SCALE, ViewInputs, ViewRenderer, collate_views
from ced_train.stages import evaluate as evaluate_stage
from ced_train.stages.teach import teacher_pass
from ced_train.teachers import TaggerTeacher, TeacherEnsemble
from ced_train.views import ViewDataset
from data_prep.audioset import AudioIndex, read_segments
from data_prep.sharding import SourceRow, available_cpus, build_shards
from data_prep.synthetic import generate

TOP_K, VIEWS = 20, 2
LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed"}
# Guessed seconds beyond --seconds that a step costs on one H100 of a 16-core host (Trainer set-up, DataLoader
# workers, caching batches; the first compiled fit of a precision compiles forward and backward, later ones of that
# precision hit Inductor's caches; the teacher pass's set-up), for the --budget check.
COST_S = {"fit": 6, "compile": 60, "recompile": 5, "bare": 2, "evaluate": 15, "ddp": 30, "render": 10, "teach": 10}
# CPU seconds per clip of making the data: data_prep.synthetic's generation of a distinct clip and the sharding
# (decode, resample, FLAC) of a row; measured 0.036 and 0.008 on a 2-core x86 VM, with a margin.
DATA_S_PER_CLIP_CORE = {"generate": 0.05, "shard": 0.012}
TEACH_VIEWS_PER_S = 2000  # guessed (clip, view)/s of the teacher pass of 2 x CED-Base under bf16 on an H100
# Per float32 rendering, the rounding bound's multiple of float32 epsilon (`render_tolerance_db`).
RENDER_ROUNDING = 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def render_tolerance_db(mel_db: torch.Tensor, inputs: ViewInputs) -> torch.Tensor:
    """How far two float32 renderings of the views of `inputs` (on two devices, or in two batch sizes on one) may
    differ at each cell, in dB, from `mel_db`: the un-augmented log-mel of `inputs.waveforms`
    (`ViewRenderer.log_mel`). Returns `(views, 64, frames)`.

    The derivation, as tests/test_parity.py's `assert_db_close`: a float32 STFT errs in a bin by |e| = c·ε·(the
    frame's amplitude), ε = 2^-23, which moves a bin of power P by 2·sqrt(P)·|e|, that is its dB value by
    8.7·c·ε·10^(d/20) at d dB below the clip's peak (amplitude, not power: the error is a cross term); taking the
    log10 and scaling by 10 adds a few ε·|v| at a value of v dB. So a rendering is within k·ε·(|v| + 10^(d/20)) dB
    of the exact value. Against float64 torch.stft, on 347 synthetic clips at every level down to the 120 dB floor
    (the floor and the 1e-10 clamp are 1-Lipschitz: they only shrink differences), k was at most 6.3 for
    torch.stft (pocketfft; cuFFT is an FFT too) and 19 for the direct DFT of the ONNX graph
    (`stft_as_convolution`: 512-term sums, whose error grows as sqrt(n), not log(n)). RENDER_ROUNDING = 32 per
    rendering covers the direct DFT 1.7 times and an FFT 5 times; two renderings may differ by twice that:
    2.4e-4 dB at a 30 dB peak, 8e-3 dB 60 dB below it, 8 dB at the floor (where float32 holds no digits). Those
    levels are the un-augmented clips'; `apply` carries the bound to the views as it carries the values (shifted
    with them, mixed with the same weights: a convex combination, whose own roundings are within 3·ε·|v|), and
    makes it 0 where both sides hold the mask value. Without TF32 (float32 matmul precision "highest", torch's
    default, recorded in the JSON): TF32's 10-bit mantissa breaks the bound.
    """
    eps = torch.finfo(torch.float32).eps
    mel_db = mel_db.double()
    below_db = mel_db.amax(dim=(-2, -1), keepdim=True) - mel_db
    per_clip = (2 * RENDER_ROUNDING * eps * (mel_db.abs() + 10.0 ** (below_db / 20))).float()
    return apply(per_clip[inputs.clip], inputs.params, per_clip[inputs.partner], fill_db=0.0)


def deviation(rendered: torch.Tensor, reference: torch.Tensor, tolerance_db: torch.Tensor) -> dict:
    """`Report.check` arguments: the largest |difference| as a fraction of its cell's tolerance (limit 1), and the
    largest |difference| in dB."""
    difference = (rendered - reference).abs()
    fraction = torch.where(difference == 0, 0.0, difference / tolerance_db)  # masked cells (tolerance 0): equal
    return {"value": fraction.max().item(), "limit": 1.0, "max_abs_db": difference.max().item()}


class TimeBox(StepTimer):
    """`StepTimer` that times from the end of the warm-up to `seconds` later, to `deadline` (a `time.perf_counter()`
    value: the end of the budget), or, with `within_epoch`, to the end of the epoch in which it started (the next
    one restarts the DataLoader workers' iterators), whichever comes first; ranks stop together, at the same step,
    with the device synchronised at both ends of the timing.

    The warm-up is `warmup` steps (first batches, compilation) plus the batches the DataLoader's workers render ahead
    (`num_workers * prefetch_factor`): they fill that queue while the first steps run, and timed, it would be served
    at no cost. A fit that reaches the deadline still warming up stops there (`overran`)."""

    def __init__(self, warmup: int, seconds: float, deadline: float, within_epoch: bool) -> None:
        super().__init__(warmup)
        self.seconds = seconds
        self.deadline = deadline
        self.within_epoch = within_epoch
        self.warmup_s = 0.0
        self.overran = False
        self.epoch_batches = 0
        self.timed_steps = 0
        self.device_syncs: int | None = None  # implicit device synchronisations in the timed steps (CUDA only)
        self._train_start = 0.0
        self._sync_warnings: tuple[warnings.catch_warnings, list] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()
        loader = trainer.train_dataloader
        self.warmup += loader.num_workers * (loader.prefetch_factor or 0)
        self.epoch_batches = trainer.num_training_batches
        needed = self.warmup + max(2, loader.num_workers)  # every worker's turn at least once
        if self.within_epoch and self.epoch_batches < needed:
            raise ValueError(f"an epoch of {self.epoch_batches} batches is too short to time: {self.warmup} warm-up "
                             f"steps (with the {loader.num_workers} workers' queue) and {needed - self.warmup} timed "
                             "ones need more --clips (or fewer --workers)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize(pl_module.device)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.warmup_s = self.start - self._train_start
            # Each implicit sync (a device value read) warns once; one device only (a DDP vote below reads one).
            if pl_module.device.type == "cuda" and trainer.world_size == 1:
                catcher = warnings.catch_warnings(record=True)
                self._sync_warnings = (catcher, catcher.__enter__())
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    def _count_syncs(self) -> None:
        if self._sync_warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            catcher, caught = self._sync_warnings
            catcher.__exit__(None, None, None)
            self.device_syncs = sum("synchroniz" in str(warning.message) for warning in caught)
            self._sync_warnings = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        now = time.perf_counter()
        timing = self.start is not None
        self.timed_steps += timing
        due = now >= self.deadline or (timing and now - self.start >= self.seconds)
        epoch_ends = timing and self.within_epoch and batch_idx + 1 >= trainer.num_training_batches
        # Ranks decide together: one that stopped alone would leave the others waiting in the gradient all-reduce.
        if trainer.strategy.reduce_boolean_decision(due, all=False) or epoch_ends:
            self._count_syncs()
            synchronize(pl_module.device)
            if timing:
                self.elapsed = time.perf_counter() - self.start
            else:
                self.overran, self.warmup_s = True, now - self._train_start
            trainer.should_stop = True


class CachedViews(ViewsDataModule):
    """`ViewsDataModule` whose epochs serve its first `cached` training batches over and over, rendered once and kept
    on the device: the same fit without the data path."""

    def __init__(self, *args, cached: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cached = cached

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            batches = iter(self.train_batches)
            device = self.trainer.strategy.root_device
            count = min(self.cached, self.num_batches)
            self.batches = [move_data_to_device(next(batches), device) for _ in range(count)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader((self.batches * math.ceil(self.num_batches / len(self.batches)))[: self.num_batches],
                          batch_size=None)


def data_cost_s(clips: int, distinct: int, cpus: int) -> float:
    """Estimated seconds of `make_shards` on `cpus` cores."""
    return (distinct * DATA_S_PER_CLIP_CORE["generate"] + clips * DATA_S_PER_CLIP_CORE["shard"]) / cpus


def make_shards(root: Path, clips: int, distinct: int, workers: int) -> Path:
    """`root/shards`: `clips` rows (a few defective ones are skipped) sharded by data_prep (labelled, 64 a shard) from
    `distinct` clips of data_prep.synthetic in AudioSet's layout; beyond `distinct`, rows repeat the clips under keys
    of their own (`<key>-c1`, ...)."""
    generate(root / "raw", train=distinct, eval_=0, seed=0, workers=workers)
    classes = load_class_labels(root / "raw" / "class_labels_indices.csv")
    sources = read_segments([root / "raw" / "balanced_train_segments.csv"], AudioIndex(root / "raw" / "audio"),
                            classes)
    copies = [dataclasses.replace(row, key=f"{row.key}-c{copy}", source_row=f"{row.source_row} (copy {copy})")
              for copy in range(1, math.ceil(clips / distinct)) for row in sources if isinstance(row, SourceRow)]
    build_shards((sources + copies)[:clips], root / "shards", classes, tool="benchmarks.gpu_check", labelled=True,
                 samples_per_shard=64, workers=workers, progress=False)
    shutil.rmtree(root / "raw")  # a gigabyte of mixed-format sources at the default size; the shards are what is read
    return root / "shards"


def forward_rate(fn, items: int, seconds: float, device: torch.device, warmup: int = 3) -> float:
    """Items per second of `fn()` (which handles `items`) over `seconds`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * items / elapsed


def fit_rate(args, shards: Path, store: Path, precision: str, compile: bool, cached: bool, devices: int = 1,
             workers: int | None = None, checkpoint: Path | None = None) -> dict:
    """Clips per second (all ranks) of the student's distillation fit, and how it was timed; see the module
    docstring. Writes the student to `checkpoint` (Lightning's format, which evaluate reads) if that does not exist."""
    pl.seed_everything(0, verbose=False)
    module = TaggerModule(model=create_model(args.student, pooling="logit"), model_name=args.student, loss=TopKBCE(),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                          scheduler=functools.partial(warmup_cosine, warmup_steps=100), compile=compile,
                          head_bias_prior=0.01)
    data_kwargs = dict(batch_size=args.batch, eval_batch_size=args.batch,
                       num_workers=args.workers if workers is None else workers, seed=0, store=str(store))
    data = (CachedViews(str(shards), str(shards), cached=2, **data_kwargs) if cached
            else ViewsDataModule(str(shards), str(shards), **data_kwargs))
    timer = TimeBox(args.warmup_steps, args.seconds, args.deadline, within_epoch=not cached)
    accelerator = "gpu" if args.device.type == "cuda" else "cpu"
    # gradient_clip_val as configs/trainer/default.yaml: clipping is part of every real step.
    trainer = pl.Trainer(max_epochs=1000, max_steps=1_000_000, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator=accelerator, devices=devices,
                         strategy="ddp" if devices > 1 else "auto", precision=LIGHTNING_PRECISION[precision],
                         gradient_clip_val=5.0, callbacks=[timer])
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    result = {"clips_per_s": timer.clips_per_s * trainer.world_size if timer.elapsed else 0.0,
              "timed_clips": timer.clips * trainer.world_size, "timed_s": timer.elapsed, "warmup_s": timer.warmup_s,
              "warmup_steps": timer.warmup, "timed_steps": timer.timed_steps, "epoch_batches": timer.epoch_batches,
              "overran": timer.overran, "global_rank": trainer.global_rank, "device_syncs": timer.device_syncs,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else None}
    if checkpoint is not None and not checkpoint.exists():
        trainer.save_checkpoint(checkpoint)
    # Persistent DataLoader workers live as long as their loader, which the trainer's reference cycles keep.
    del trainer, data, module
    gc.collect()
    return result


class Report:
    """Figures in the order measured, the ratios between them, the checks, what was skipped and why, and why the run
    stopped early if it did; rewritten to the JSON file `out` (atomically) after every figure, so a run stopped at a
    device limit still leaves what it had measured."""

    def __init__(self, budget_s: float, out: Path, context: dict) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.out = out
        self.context = context
        self.figures: dict[str, dict] = {}
        self.checks: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.failed: list[str] = []
        self.stopped: str | None = None

    @property
    def deadline(self) -> float:
        """The end of the budget, as a `time.perf_counter()` value."""
        return self.start + self.budget_s

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(f"{self.out.name}.partial")
        partial.write_text(json.dumps({**self.context, "figures": self.figures, "ratios": self.ratios(),
                                       "checks": self.checks, "skipped": self.skipped, "failed": self.failed,
                                       "stopped": self.stopped, "total_s": time.perf_counter() - self.start},
                                      indent=2))
        os.replace(partial, self.out)

    def time_left(self, name: str, cost_s: float) -> bool:
        """Whether a step of `cost_s` estimated seconds ends within the budget; if not, it is skipped."""
        elapsed = time.perf_counter() - self.start
        if elapsed + cost_s <= self.budget_s:
            return True
        self.skip(name, f"{elapsed:.0f} s spent + about {cost_s:.0f} s would pass --budget {self.budget_s:g} s")
        return False

    @contextlib.contextmanager
    def attempt(self, name: str):
        """Run a measurement; an exception is printed and recorded as the reason `name` is missing, and the run goes
        on: one broken setting must not cost the other figures of a device lease. Once the run is being stopped
        (`stopped`), errors propagate: they are the stop's (a DataLoader worker killed by the same signal)."""
        try:
            yield
        except Exception as error:
            if self.stopped:
                raise
            traceback.print_exc()
            self.failed.append(name)
            self.skip(name, f"failed: {type(error).__name__}: {error}".splitlines()[0][:300])

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        print(f"skipped {name}: {why}", flush=True)
        self.save()

    def add(self, name: str, clips_per_s: float, unit: str = "clips/s", **extra) -> None:
        self.figures[name] = {"rate": clips_per_s, "unit": unit, **{k: v for k, v in extra.items() if v is not None}}
        print(f"  {name:44s} {clips_per_s:10.1f} {unit}", flush=True)
        self.save()

    def check(self, name: str, value: float, limit: float, **extra) -> None:
        """A measured deviation against its limit (met: value <= limit)."""
        self.checks[name] = {"value": value, "limit": limit, "met": value <= limit, **extra}
        print(f"  check {self._check_line(name)}", flush=True)
        self.save()

    def _check_line(self, name: str) -> str:
        check = self.checks[name]
        extra = "".join(f", {key} {value:.2e}" for key, value in check.items() if key not in ("value", "limit", "met"))
        return (f"{name:52s} {check['value']:10.2e} (limit {check['limit']:g}: "
                f"{'met' if check['met'] else 'MISSED'}{extra})")

    def exit_status(self) -> int:
        return 1 if self.failed or not all(check["met"] for check in self.checks.values()) else 0

    def ratios(self) -> dict[str, float]:
        rate = {name: figure["rate"] for name, figure in self.figures.items()}
        pairs = {"teach: pass / bare ensemble forward": ("teach pass", "teach bare forward"),
                 "evaluate: stage / bare clip_probabilities": ("evaluate stage", "evaluate bare")}
        for precision in LIGHTNING_PRECISION:
            for path in ("data path", "cached"):
                pairs[f"distill {precision} {path}: compile on / off"] = (
                    f"distill {precision} compile {path}", f"distill {precision} eager {path}")
            for mode in ("eager", "compile"):
                pairs[f"distill {precision} {mode}: data path / cached"] = (
                    f"distill {precision} {mode} data path", f"distill {precision} {mode} cached")
        for mode in ("eager", "compile"):
            for path in ("data path", "cached"):
                pairs[f"distill {mode} {path}: bf16 / fp16"] = (f"distill bf16 {mode} {path}",
                                                                f"distill fp16 {mode} {path}")
        ratios = {name: rate[a] / rate[b] for name, (a, b) in pairs.items() if a in rate and b in rate}
        ddp = self.figures.get("ddp bf16 eager data path")
        if ddp and "distill bf16 eager data path" in rate:
            ratios[f"ddp: {ddp['devices']} devices / ({ddp['devices']} x one)"] = (
                ddp["rate"] / (ddp["devices"] * rate["distill bf16 eager data path"]))
        return ratios

    def print_table(self) -> None:
        print(f"\n{'figure':44s} {'rate':>10s}  {'unit':14s} {'warm-up s':>9s} {'timed s':>7s} {'peak GiB':>8s}")
        for name, f in self.figures.items():
            cells = [f"{f[key]:{width}.1f}" if key in f else " " * width for key, width in
                     (("warmup_s", 9), ("timed_s", 7), ("peak_gib", 8))]
            print(f"{name:44s} {f['rate']:10.1f}  {f['unit']:14s} {' '.join(cells)}")
        print()
        for name, value in self.ratios().items():
            print(f"ratio {name:52s} {value:6.3f}")
        for name in self.checks:
            print(f"check {self._check_line(name)}")
        for name, why in self.skipped.items():
            print(f"skipped {name}: {why}")
        if self.stopped:
            print(f"stopped: {self.stopped}")
        print(f"total {time.perf_counter() - self.start:.0f} s")


def environment(args) -> dict:
    import lightning
    import timm

    env = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
           "timm": timm.__version__, "cpus": available_cpus(), "device": str(args.device),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if args.device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(args.device), "gpus_visible": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    return env


def run_teach(args, report: Report, shards: Path, store: Path, clips: int) -> None:
    if not report.time_left("teach pass", COST_S["teach"] + clips * VIEWS / TEACH_VIEWS_PER_S):
        return
    torch.manual_seed(0)
    ensemble = TeacherEnsemble([TaggerTeacher(create_model(name)) for name in args.teachers])
    summary = teacher_pass(shards, store, ensemble, AugmentConfig(), seed=0, num_views=VIEWS, top_k=TOP_K,
                           batch_size=args.teach_batch, num_workers=args.workers, precision="bf16",
                           device=str(args.device), progress=False)
    report.add("teach pass", summary["views_per_s"], "(clip, view)/s", timed_s=summary["elapsed_s"],
               clips=clips, views=VIEWS)
    if report.time_left("teach bare forward", args.seconds + COST_S["bare"]):
        mel_db = torch.randn(args.teach_batch, 64, 1001, device=args.device) * 20 - 40
        ensemble = ensemble.to(args.device).eval()

        def forward():
            with torch.inference_mode(), torch.autocast(args.device.type, dtype=torch.bfloat16):
                ensemble(mel_db).float().topk(TOP_K, dim=1)

        report.add("teach bare forward", forward_rate(forward, args.teach_batch, args.seconds, args.device),
                   "(clip, view)/s", timed_s=args.seconds)


def run_render(args, report: Report, shards: Path, store: Path) -> None:
    """Views of the store rendered on the CPU and on the device, whole and in other batch sizes, compared within
    `render_tolerance_db`, which a second float32 front end on the CPU checks; the device's rate."""
    if not report.time_left("render", args.seconds + COST_S["render"]):
        return
    dataset = ViewDataset(shards, store=store)
    items = list(dataset.render(0, min(args.teach_batch, dataset.num_rows)))
    inputs = collate_views(items)
    on_cpu = ViewRenderer()
    reference = on_cpu(inputs)
    tolerance_db = render_tolerance_db(on_cpu.log_mel(inputs.waveforms.float() / PCM_SCALE), inputs)
    direct_dft = ViewRenderer()
    direct_dft.front_end.stft_as_convolution()
    report.check("render: CPU, direct DFT vs FFT, max |difference| / bound", **deviation(direct_dft(inputs),
                                                                                       reference, tolerance_db))
    renderer = ViewRenderer().to(args.device)
    whole = renderer(inputs.to(args.device)).cpu()
    report.check("render: device vs CPU, max |difference| / bound", **deviation(whole, reference, tolerance_db))
    pieces = {size: torch.cat([renderer(collate_views(items[i : i + size]).to(args.device)).cpu()
                               for i in range(0, len(items), size)]) for size in (1, 7)}
    report.check("render: device, batches of 1 and 7 vs one, max |diff.| / bound",
                 **max((deviation(piece, whole, tolerance_db) for piece in pieces.values()),
                       key=lambda found: found["value"]))
    device_inputs = inputs.to(args.device)
    report.add("render on device", forward_rate(lambda: renderer(device_inputs), len(items), args.seconds,
                                                args.device), "views/s", timed_s=args.seconds,
               distinct_clips=inputs.waveforms.shape[0])


def distill_settings(args) -> list[tuple[str, bool]]:
    """(precision, compile) of the distill fits, in order of interest."""
    settings = [(precision, compile) for compile in args.compile for precision in args.precisions]
    return sorted(settings, key=lambda setting: (setting[0] != "bf16", setting[1]))


def run_distill(args, report: Report, shards: Path, store: Path, checkpoint: Path, precision: str,
                compile: bool) -> None:
    mode = "compile" if compile else "eager"
    if precision == "fp16" and args.device.type == "cpu":
        report.skip(f"distill fp16 {mode}", "on a CPU Lightning runs precision 16-mixed as bf16-mixed (it warns so)")
        return
    compiled_before = any(name.startswith(f"distill {precision} compile") for name in report.figures)
    compile_s = (COST_S["recompile"] if compiled_before else COST_S["compile"]) if compile else 0
    for cached in (False, True):
        name = f"distill {precision} {mode} {'cached' if cached else 'data path'}"
        if not report.time_left(name, args.seconds + COST_S["fit"] + compile_s):
            continue
        with report.attempt(name):
            result = fit_rate(args, shards, store, precision, compile, cached, checkpoint=checkpoint)
            if result["overran"]:
                report.skip(name, f"still warming up (compiling) after {result['warmup_s']:.0f} s, at --budget "
                                  f"{args.budget:g} s")
                continue
            report.add(name, result["clips_per_s"], batch=args.batch, **{key: result[key] for key in (
                "timed_s", "warmup_s", "peak_gib", "timed_clips", "timed_steps", "warmup_steps", "epoch_batches",
                "device_syncs")})
            compile_s = COST_S["recompile"] if compile else 0


def evaluate_config(args, shards: Path, checkpoint: Path, out_dir: Path):
    """The app's config (`python -m ced_train stages=[evaluate]`) for the student on the shards, without the
    baseline probe (the networks' rate alone), composed as the app does, so the stage finds every key it reads."""
    def value(setting) -> str:  # a Hydra override value: null, a number, or a quoted string
        if setting is None or isinstance(setting, int):
            return "null" if setting is None else str(setting)
        return "'" + str(setting).replace("\\", "\\\\").replace("'", "\\'") + "'"

    settings = {"paths.root_dir": out_dir, "paths.output_dir": out_dir, "evaluate.shards": shards,
                "evaluate.checkpoint": checkpoint, "evaluate.batch_size": args.batch,
                "evaluate.num_workers": args.workers, "evaluate.device": args.device, "evaluate.precision": "bf16",
                "evaluate.out_dir": out_dir, "evaluate.baseline_shards": None}
    return compose(["~local", *(f"{key}={value(setting)}" for key, setting in settings.items())])


def run_evaluate(args, report: Report, shards: Path, checkpoint: Path, out_dir: Path) -> None:
    if not checkpoint.exists():
        report.skip("evaluate", "no student checkpoint (the first distill fit was skipped)")
        return
    if not report.time_left("evaluate", COST_S["evaluate"]):
        return
    clips = read_manifest(shards).num_samples
    cfg = evaluate_config(args, shards, checkpoint, out_dir)
    start = time.perf_counter()
    evaluate_stage.run(cfg)
    elapsed = time.perf_counter() - start
    report.add("evaluate stage", clips / elapsed, timed_s=elapsed, clips=clips)
    if report.time_left("evaluate bare", args.seconds + COST_S["bare"]):
        model = load_checkpoint(checkpoint).to(args.device)
        waveform = torch.randn(args.batch, 160000, device=args.device) * 0.1
        lengths = torch.full((args.batch,), 160000, device=args.device)

        def forward():
            with torch.inference_mode(), torch.autocast(args.device.type, dtype=torch.bfloat16):
                clip_probabilities(model, waveform, lengths)

        report.add("evaluate bare", forward_rate(forward, args.batch, args.seconds, args.device),
                   timed_s=args.seconds)


def run_ddp(args, report: Report, shards: Path, store: Path, root: Path) -> None:
    devices = torch.cuda.device_count() if args.device.type == "cuda" else args.cpu_ddp
    if devices < 2:
        report.skip("ddp", f"{devices} {'GPU' if args.device.type == 'cuda' else 'CPU process'} (needs 2 or more; "
                           "on CPU pass --cpu-ddp N)")
        return
    if not report.time_left("ddp", args.seconds + COST_S["ddp"]):
        return
    result = root / "ddp.json"
    budget_left_s = report.deadline - time.perf_counter()
    command = [sys.executable, __file__, "--ddp-child", str(shards), str(store), str(result), "--devices", str(devices),
               "--budget", f"{budget_left_s:.0f}", *args.passthrough]
    with report.attempt("ddp"):
        subprocess.run(command, check=True)
        figure = json.loads(result.read_text())
        if figure.pop("overran"):
            report.skip("ddp", f"still warming up after {figure['warmup_s']:.0f} s, at --budget {args.budget:g} s")
        else:
            report.add("ddp bf16 eager data path", **figure)


def ddp_child(args) -> None:
    """One DDP fit (Lightning starts the other ranks by re-running this command line); rank 0 writes the figure."""
    shards, store, result = map(Path, args.ddp_child)
    workers = max(1, args.workers // args.devices)
    fit = fit_rate(args, shards, store, "bf16", False, False, devices=args.devices, workers=workers)
    if fit["global_rank"] == 0:
        result.write_text(json.dumps({"clips_per_s": fit["clips_per_s"], "devices": args.devices,
                                      "workers_per_rank": workers, **{key: fit[key] for key in (
                                          "timed_s", "warmup_s", "peak_gib", "timed_steps", "warmup_steps",
                                          "epoch_batches", "overran")}}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda if there is one; on a CPU "
                                                         "auto means --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 96 rows of 24 clips, teachers ced_test, batch 4, 1.5 s a measurement, no "
                             "compile, 1 CPU thread")
    parser.add_argument("--out", type=Path, help="JSON of the figures (default: $OUT/gpu_check.json if OUT is set, "
                                                 "else gpu_check.json in the temp directory)")
    parser.add_argument("--clips", type=int, help="rows of the synthetic shards (a few are defective and skipped): "
                                                  "one epoch; default 16384")
    parser.add_argument("--distinct", type=int, help="synthetic clips generated, which the rows repeat; default 2048")
    parser.add_argument("--seconds", type=float, help="timed seconds of each measurement; default 5")
    parser.add_argument("--budget", type=float, default=220.0,
                        help="seconds from the end of the imports that the run may take; steps that would end "
                             "later are skipped (default 220: with imports the run fits 4 minutes)")
    parser.add_argument("--student", default="ced_tiny")
    parser.add_argument("--teachers", nargs="+", help="teacher variants; default ced_base ced_base")
    parser.add_argument("--batch", type=int, help="student and evaluate clips per batch; default 64")
    parser.add_argument("--teach-batch", type=int, help="(clip, view) inputs per ensemble call; default 64")
    parser.add_argument("--workers", type=int, help="DataLoader workers; default the CPUs less two")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="untimed steps before each timed fit (a data-path fit adds its workers' queue)")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp16"], default=["bf16", "fp16"])
    parser.add_argument("--compile", choices=["off", "on", "both"], help="torch.compile of the student; default "
                                                                         "both (off with --quick)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads; default torch's own, 1 with --quick on a CPU "
                                                    "(spinning threads of a busy 2-core machine slow it tenfold)")
    parser.add_argument("--cpu-ddp", type=int, default=0, help="on a CPU, processes of the DDP section (smoke test)")
    parser.add_argument("--ddp-child", nargs=3, metavar=("SHARDS", "STORE", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu" and not args.quick:
            print("no GPU: running the --quick configuration on the CPU")
            args.quick = True
    args.device = torch.device(args.device)
    quick = args.quick
    defaults = {"clips": 96 if quick else 16384, "distinct": 24 if quick else 2048, "seconds": 1.5 if quick else 5.0,
                "batch": 4 if quick else 64, "teach_batch": 8 if quick else 64,
                "teachers": ["ced_test"] * 2 if quick else ["ced_base"] * 2,
                "workers": 1 if quick else max(1, available_cpus() - 2), "compile": "off" if quick else "both",
                "threads": 1 if quick and args.device.type == "cpu" else torch.get_num_threads()}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.distinct = min(args.distinct, args.clips)
    torch.set_num_threads(args.threads)
    # The DDP child gets the resolved settings, not --quick (which would reset what the parent was told).
    args.passthrough = ["--device", args.device.type, "--seconds", str(args.seconds), "--batch", str(args.batch),
                        "--workers", str(args.workers), "--warmup-steps", str(args.warmup_steps),
                        "--student", args.student, "--threads", str(args.threads)]
    args.compile = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return args


def run_sections(args, report: Report, root: Path) -> None:
    """The data, then every section in order of interest; a section that fails is recorded and the next one runs."""
    cpus = available_cpus()
    if not report.time_left("data and every section", data_cost_s(args.clips, args.distinct, cpus)):
        return
    start = time.perf_counter()
    # With SIGTERM's default action: a process forked while a Python handler is set loses a SIGTERM that arrives
    # before it first runs (CPython clears pending signals in the child), and data_prep's pools end with terminate()
    # and join(), which then waits for a late-starting worker forever. Stopped here, the JSON holds the settings.
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        shards = make_shards(root, args.clips, args.distinct, cpus)
    finally:
        signal.signal(signal.SIGTERM, previous)
    clips = read_manifest(shards).num_samples
    data_s = time.perf_counter() - start
    report.context |= {"clips": clips, "distinct_clips": args.distinct, "data_s": data_s}
    print(f"data: {clips} rows of {args.distinct} synthetic clips sharded in {data_s:.1f} s (estimate "
          f"{data_cost_s(args.clips, args.distinct, cpus):.0f} s); student {args.student}, teachers "
          f"{' + '.join(args.teachers)}, batch {args.batch}, {args.workers} DataLoader workers, {args.seconds:g} s a "
          "measurement", flush=True)
    store, checkpoint = root / "store" / "teachers.h5", root / "student.ckpt"
    with report.attempt("teach"):
        run_teach(args, report, shards, store, clips)
    if not store.exists():
        report.skip("render, distill, evaluate, ddp", "no teacher store (the teacher pass did not run to its end)")
        return
    with report.attempt("render"):
        run_render(args, report, shards, store)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()  # the teachers' memory, before the student's fits
    first, *rest = distill_settings(args)
    run_distill(args, report, shards, store, checkpoint, *first)
    with report.attempt("evaluate"):
        run_evaluate(args, report, shards, checkpoint, root / "evaluate")
    run_ddp(args, report, shards, store, root)
    for setting in rest:
        run_distill(args, report, shards, store, checkpoint, *setting)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.ddp_child:
        args.deadline = time.perf_counter() + args.budget
        ddp_child(args)
        return 0
    out = args.out or Path(os.environ.get("OUT") or tempfile.gettempdir()) / "gpu_check.json"
    env = environment(args)
    print(" ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    settings = {"student": args.student, "teachers": args.teachers, "batch": args.batch,
                "teach_batch": args.teach_batch, "views": VIEWS, "top_k": TOP_K, "workers": args.workers,
                "threads": args.threads, "seconds": args.seconds, "warmup_steps": args.warmup_steps,
                "budget_s": args.budget}
    report = Report(args.budget, out, {"environment": env, "settings": settings})
    report.save()
    args.deadline = report.deadline

    signalled: dict[str, int] = {}

    def stop(signum, frame) -> None:
        # Lightning, during a fit, runs its own SIGTERM handler and then this one.
        signalled["status"] = 128 + signum
        report.stopped = f"{signal.Signals(signum).name} after {time.perf_counter() - report.start:.0f} s"
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # Forked processes (DataLoader workers) die of SIGTERM as they would without this script's handler, or
    # Lightning's: run there, the handler's exception would leave a worker joining its queue's feeder thread forever.
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        with tempfile.TemporaryDirectory(prefix="ced_gpu_check_") as tmp:
            run_sections(args, report, Path(tmp))
    except BaseException as error:  # the stop, or an error outside the sections' own handling
        report.stopped = report.stopped or f"{type(error).__name__}: {error}".splitlines()[0][:300]
        if not isinstance(error, SystemExit):
            traceback.print_exc()
        return signalled.get("status", error.code if isinstance(error, SystemExit) and isinstance(error.code, int)
                             else 1)
    finally:
        report.save()
        report.print_table()
        print(f"figures written to {out}", flush=True)
    return report.exit_status()


if __name__ == "__main__":
    sys.exit(main())
