"""Throughput of the whole CED path on one accelerator, figures and ratios measured in one run (docs/performance.md):

  teach     the teacher pass (`stages.teach.teacher_pass`) of 2 x CED-Base over synthetic shards, which writes the
            store the student replays, against the bare ensemble forward on a batch already on the device
  render    views of that store rendered on the device (`rendering.ViewRenderer`: front end + `apply`, batched):
            views/s, and the checks that they agree within 1e-4 dB with the CPU's rendering and across batch sizes
            on the device (kernels are chosen by shape)
  distill   the CED-Tiny student's Lightning fit on `ViewsDataModule` replaying that store (shards -> ViewDataset ->
            DataLoader workers -> training step + AdamW), and the same fit on a few of its batches cached on the
            device (no data path), under bf16 and fp16 autocast, torch.compile off and on
  evaluate  the evaluate stage (`stages.evaluate.run`) on a checkpoint of that student, against the bare
            `clip_probabilities` on a batch on the device
  ddp       the bf16 data-path fit over every visible GPU, in a child process (Lightning re-runs it per rank);
            skipped with one GPU

Every timed fit and forward runs `--seconds` after its warm-up (compilation included there). A measurement whose
estimated cost (`COST_S`) would end past `--budget` seconds is skipped with a printed line, so the run fits a device
lease; they run in order of interest (bf16 eager, evaluate, ddp, compile, fp16). The data is data_prep.synthetic's,
sharded by data_prep; teachers and student are randomly initialised (speed only).

    python benchmarks/gpu_check.py [--out FILE] [--seconds 5] [--clips 4096] [--budget 220]
    python benchmarks/gpu_check.py --device cpu --quick       # smoke test: small teachers, a few clips
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from train_step import StepTimer  # benchmarks/ is sys.path[0] when this file runs as a script

from ced_train.augment import AugmentConfig
from ced_train.data import read_manifest
from ced_train.labels import load_class_labels
from ced_train.lightning.data import ViewsDataModule
from ced_train.lightning.losses import TopKBCE
from ced_train.lightning.module import TaggerModule, clip_probabilities
from ced_train.lightning.schedules import warmup_cosine
from ced_train.models import create_model, load_checkpoint
from ced_train.rendering import ViewRenderer, collate_views
from ced_train.stages import evaluate as evaluate_stage
from ced_train.stages.teach import teacher_pass
from ced_train.teachers import TaggerTeacher, TeacherEnsemble
from ced_train.views import ViewDataset
from data_prep.audioset import AudioIndex, read_segments
from data_prep.sharding import available_cpus, build_shards
from data_prep.synthetic import generate

TOP_K, VIEWS = 20, 2
LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed"}
# Guessed seconds beyond --seconds that a measurement costs on one H200 (Trainer set-up, DataLoader workers, caching
# batches; the first compiled fit of a precision compiles forward and backward), for the --budget check.
COST_S = {"fit": 6, "compile": 60, "bare": 2, "evaluate": 15, "ddp": 30, "render": 10}
RENDER_TOLERANCE_DB = 1e-4  # rendered views of one store on two devices, or in two batch sizes on one


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimeBox(StepTimer):
    """`StepTimer` that ends the fit after `seconds` of timed steps (on every rank at the same step), with the device
    synchronised at both ends of the timing, and that notes the warm-up's wall time (first batches, compilation)."""

    def __init__(self, warmup: int, seconds: float) -> None:
        super().__init__(warmup)
        self.seconds = seconds
        self.warmup_s = 0.0
        self._train_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize(pl_module.device)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.warmup_s = self.start - self._train_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.start is None:
            return
        # Ranks decide together: one that stopped alone would leave the others waiting in the gradient all-reduce.
        if trainer.strategy.reduce_boolean_decision(self.elapsed >= self.seconds, all=False):
            synchronize(pl_module.device)
            self.elapsed = time.perf_counter() - self.start
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


def make_shards(root: Path, clips: int, workers: int) -> Path:
    """data_prep.synthetic's AudioSet-layout clips sharded by data_prep (labelled, 64 clips a shard): `root/shards`."""
    generate(root / "raw", train=clips, eval_=0, seed=0, workers=workers)
    classes = load_class_labels(root / "raw" / "class_labels_indices.csv")
    rows = read_segments([root / "raw" / "balanced_train_segments.csv"], AudioIndex(root / "raw" / "audio"), classes)
    build_shards(rows, root / "shards", classes, tool="benchmarks.gpu_check", labelled=True, samples_per_shard=64,
                 workers=workers, progress=False)
    shutil.rmtree(root / "raw")  # gigabytes of mixed-format sources at the default size; the shards are what is read
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
             workers: int | None = None) -> dict:
    """Clips per second (all ranks) of the student's distillation fit; see the module docstring."""
    pl.seed_everything(0, verbose=False)
    module = TaggerModule(model=create_model(args.student, pooling="logit"), model_name=args.student, loss=TopKBCE(),
                          optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                          scheduler=functools.partial(warmup_cosine, warmup_steps=100), compile=compile,
                          head_bias_prior=0.01)
    data_kwargs = dict(batch_size=args.batch, eval_batch_size=args.batch,
                       num_workers=args.workers if workers is None else workers, seed=0, store=str(store))
    data = (CachedViews(str(shards), str(shards), cached=2, **data_kwargs) if cached
            else ViewsDataModule(str(shards), str(shards), **data_kwargs))
    timer = TimeBox(args.warmup_steps, args.seconds)
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
    return {"clips_per_s": timer.clips_per_s * trainer.world_size, "timed_clips": timer.clips * trainer.world_size,
            "timed_s": timer.elapsed, "warmup_s": timer.warmup_s, "trainer": trainer,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else None}


class Report:
    """Figures in the order measured, the ratios between them, and what was skipped and why; rewritten to the JSON
    file `out` after every figure, so a run stopped at a device limit still leaves what it had measured."""

    def __init__(self, budget_s: float, out: Path, context: dict) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.out = out
        self.context = context
        self.figures: dict[str, dict] = {}
        self.checks: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.context, "figures": self.figures, "ratios": self.ratios(),
                                        "checks": self.checks, "skipped": self.skipped,
                                        "total_s": time.perf_counter() - self.start},
                                       indent=2))

    def time_left(self, name: str, cost_s: float) -> bool:
        """Whether a measurement of `cost_s` estimated seconds ends within the budget; if not, it is skipped."""
        elapsed = time.perf_counter() - self.start
        if elapsed + cost_s <= self.budget_s:
            return True
        self.skip(name, f"{elapsed:.0f} s spent + about {cost_s:.0f} s would pass --budget {self.budget_s:g} s")
        return False

    @contextlib.contextmanager
    def attempt(self, name: str):
        """Run a measurement; an exception is printed and recorded as the reason `name` is missing, and the run goes
        on: one broken setting must not cost the other figures of a device lease."""
        try:
            yield
        except Exception as error:
            traceback.print_exc()
            self.skip(name, f"failed: {type(error).__name__}: {error}".splitlines()[0][:300])

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        print(f"skipped {name}: {why}", flush=True)
        self.save()

    def add(self, name: str, clips_per_s: float, unit: str = "clips/s", **extra) -> None:
        self.figures[name] = {"rate": clips_per_s, "unit": unit, **{k: v for k, v in extra.items() if v is not None}}
        print(f"  {name:44s} {clips_per_s:10.1f} {unit}", flush=True)
        self.save()

    def check(self, name: str, value: float, limit: float) -> None:
        """A measured deviation against its limit (met: value <= limit)."""
        self.checks[name] = {"value": value, "limit": limit, "met": value <= limit}
        print(f"  check {name:52s} {value:10.2e} (limit {limit:g}: {'met' if value <= limit else 'MISSED'})",
              flush=True)
        self.save()

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
        for name, check in self.checks.items():
            print(f"check {name:52s} {check['value']:10.2e} (limit {check['limit']:g}: "
                  f"{'met' if check['met'] else 'MISSED'})")
        for name, why in self.skipped.items():
            print(f"skipped {name}: {why}")
        print(f"total {time.perf_counter() - self.start:.0f} s")


def environment(args) -> dict:
    import lightning
    import timm

    env = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
           "timm": timm.__version__, "cpus": available_cpus(), "device": str(args.device)}
    if args.device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(args.device), "gpus_visible": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    return env


def run_teach(args, report: Report, shards: Path, store: Path, clips: int) -> None:
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
    """Views of the store rendered on the CPU and on the device, whole and in other batch sizes; the device's rate."""
    if not report.time_left("render", args.seconds + COST_S["render"]):
        return
    dataset = ViewDataset(shards, store=store)
    items = list(dataset.render(0, min(args.teach_batch, dataset.num_rows)))
    inputs = collate_views(items)
    on_cpu = ViewRenderer()(inputs)
    renderer = ViewRenderer().to(args.device)
    whole = renderer(inputs.to(args.device)).cpu()
    report.check("render: device vs CPU, max |difference| in dB", (whole - on_cpu).abs().max().item(),
                 RENDER_TOLERANCE_DB)
    across = 0.0
    for size in (1, 7):
        pieces = torch.cat([renderer(collate_views(items[i : i + size]).to(args.device)).cpu()
                            for i in range(0, len(items), size)])
        across = max(across, (pieces - whole).abs().max().item())
    report.check("render: device, batches of 1 and 7 vs one batch, max |difference| in dB", across,
                 RENDER_TOLERANCE_DB)
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
    cost_s = args.seconds + COST_S["fit"] + (COST_S["compile"] if compile and not compiled_before else 0)
    for cached in (False, True):
        name = f"distill {precision} {mode} {'cached' if cached else 'data path'}"
        if not report.time_left(name, cost_s):
            continue
        with report.attempt(name):
            result = fit_rate(args, shards, store, precision, compile, cached)
            report.add(name, result["clips_per_s"], timed_s=result["timed_s"], warmup_s=result["warmup_s"],
                       peak_gib=result["peak_gib"], timed_clips=result["timed_clips"], batch=args.batch)
            if not checkpoint.exists():
                result["trainer"].save_checkpoint(checkpoint)  # evaluate reads the project's own format
        cost_s = args.seconds + COST_S["fit"]  # the compiled graph is cached in the process


def run_evaluate(args, report: Report, shards: Path, checkpoint: Path, out_dir: Path) -> None:
    if not checkpoint.exists():
        report.skip("evaluate", "no student checkpoint (the first distill fit was skipped)")
        return
    if not report.time_left("evaluate", COST_S["evaluate"]):
        return
    clips = read_manifest(shards).num_samples
    cfg = OmegaConf.create({"evaluate": {"shards": str(shards), "checkpoint": str(checkpoint), "systems": {},
                                         "batch_size": args.batch, "num_workers": args.workers,
                                         "device": str(args.device), "precision": "bf16", "out_dir": str(out_dir),
                                         "baseline_shards": None}})  # the networks' rate, without the probe
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
    command = [sys.executable, __file__, "--ddp-child", str(shards), str(store), str(result), "--devices", str(devices),
               *args.passthrough]
    with report.attempt("ddp"):
        subprocess.run(command, check=True)
        report.add("ddp bf16 eager data path", **json.loads(result.read_text()))


def ddp_child(args) -> None:
    """One DDP fit (Lightning starts the other ranks by re-running this command line); rank 0 writes the figure."""
    shards, store, result = map(Path, args.ddp_child)
    workers = max(1, args.workers // args.devices)
    fit = fit_rate(args, shards, store, "bf16", False, False, devices=args.devices, workers=workers)
    if fit["trainer"].global_rank == 0:
        result.write_text(json.dumps({"clips_per_s": fit["clips_per_s"], "timed_s": fit["timed_s"],
                                      "warmup_s": fit["warmup_s"], "peak_gib": fit["peak_gib"],
                                      "devices": args.devices, "workers_per_rank": workers}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda if there is one; on a CPU "
                                                         "auto means --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 24 clips, teachers ced_test, batch 4, 1.5 s a measurement, no compile, "
                             "1 CPU thread")
    parser.add_argument("--out", type=Path, help="JSON of the figures (default: $OUT/gpu_check.json if OUT is set, "
                                                 "else gpu_check.json in the temp directory)")
    parser.add_argument("--clips", type=int, help="synthetic clips (a few are defective and skipped); default 4096")
    parser.add_argument("--seconds", type=float, help="timed seconds of each measurement; default 5")
    parser.add_argument("--budget", type=float, default=220.0,
                        help="seconds from the end of the imports that the run may take; measurements that would "
                             "end later are skipped (default 220: with imports the run fits 4 minutes)")
    parser.add_argument("--student", default="ced_tiny")
    parser.add_argument("--teachers", nargs="+", help="teacher variants; default ced_base ced_base")
    parser.add_argument("--batch", type=int, help="student and evaluate clips per batch; default 64")
    parser.add_argument("--teach-batch", type=int, help="(clip, view) inputs per ensemble call; default 64")
    parser.add_argument("--workers", type=int, help="DataLoader workers; default the CPUs less two")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before each timed fit")
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
    defaults = {"clips": 24 if quick else 4096, "seconds": 1.5 if quick else 5.0, "batch": 4 if quick else 64,
                "teach_batch": 8 if quick else 64, "teachers": ["ced_test"] * 2 if quick else ["ced_base"] * 2,
                "workers": 1 if quick else max(1, available_cpus() - 2), "compile": "off" if quick else "both",
                "threads": 1 if quick and args.device.type == "cpu" else torch.get_num_threads()}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    # The DDP child gets the resolved settings, not --quick (which would reset what the parent was told).
    args.passthrough = ["--device", args.device.type, "--seconds", str(args.seconds), "--batch", str(args.batch),
                        "--workers", str(args.workers), "--warmup-steps", str(args.warmup_steps),
                        "--student", args.student, "--threads", str(args.threads)]
    args.compile = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.ddp_child:
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
    with tempfile.TemporaryDirectory(prefix="ced_gpu_check_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        shards = make_shards(root, args.clips, max(1, available_cpus()))
        clips = read_manifest(shards).num_samples
        data_s = time.perf_counter() - start
        report.context |= {"clips": clips, "data_s": data_s}
        print(f"data: {clips} clips of synthetic audio sharded in {data_s:.1f} s; student {args.student}, teachers "
              f"{' + '.join(args.teachers)}, batch {args.batch}, {args.workers} DataLoader workers, "
              f"{args.seconds:g} s a measurement", flush=True)
        store, checkpoint = root / "store" / "teachers.h5", root / "student.ckpt"
        with report.attempt("teach"):
            run_teach(args, report, shards, store, clips)
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
    report.print_table()
    report.save()
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
