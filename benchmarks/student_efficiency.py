"""What each learning-efficiency setting of the demo's student is worth: CED-Tiny students distilled from the demo's
store (`make demo` first) for the recipe's 8 epochs, seed 0, validated after every epoch, one setting changed at a
time from the settings before they existed (head bias prior 0.01, BatchNorm statistics as an exponential average
from the first batch, float32; precision auto is bf16 on CPUs with AVX512-BF16 or AMX), then the recipe's own
settings and a learning-rate variant of them. Measured in one
run:

  runs      per variant, `python -m ced_train +recipe=tiny_distill stages=[distill,evaluate] OVERRIDES` in a
            subprocess (the real app), only the student evaluated; students and logs under
            <artifacts>/tiny_distill/efficiency/<variant>

Prints validation mAP per epoch, eval mAP, training seconds and seconds per optimiser step of every variant. About
4 to 5 minutes a variant on 2 CPU cores; `--variants` picks some, `--smoke` (1 epoch of `ced_test`) checks the path.

    python benchmarks/student_efficiency.py [--variants NAME ...] [--smoke] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _demo_app import recipe_config, require_demo, run_app

RECIPE = "tiny_distill"
BEFORE = ["distill.head_bias_prior=0.01", "~callbacks.batchnorm_start"]
# name → (what it shows, overrides on the recipe); each one setting away from one above it.
VARIANTS = {
    "before_fp32": ("prior 0.01, EMA BatchNorm, fp32 (the previous defaults)",
                    [*BEFORE, "distill.trainer.precision=32-true"]),
    "before": ("prior 0.01, EMA BatchNorm, bf16", BEFORE),
    "store_prior": ("+ head prior from the store", [BEFORE[1]]),
    "bn_cumulative": ("+ cumulative BatchNorm start", [BEFORE[0]]),
    "recipe": ("store prior + cumulative BatchNorm, bf16 (the recipe)", []),
    "lr1e-3": ("the recipe, lr 1e-3", ["distill.optim.optimizer.lr=1e-3"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("CED_ROOT", Path.cwd())),
                        help="where the demo's data/ and runs/ are (default: CED_ROOT, else the current directory)")
    parser.add_argument("--smoke", action="store_true", help="check the path: 1 epoch of ced_test")
    args = parser.parse_args()
    root = args.root.resolve()
    cfg = recipe_config(RECIPE, root, args.overrides)
    require_demo(cfg, root, "student_efficiency.py")
    epochs = 1 if args.smoke else cfg.distill.trainer.max_epochs
    common = ["stages=[distill,evaluate]", "logger=csv", f"distill.trainer.max_epochs={epochs}",
              "distill.trainer.check_val_every_n_epoch=1", "distill.overwrite=true", *args.overrides]
    if args.smoke:
        common += ["model@distill.model=ced_test", "distill.optim.scheduler.warmup_steps=0"]
    work_dir = Path(cfg.paths.artifacts_dir) / cfg.name / ("efficiency_smoke" if args.smoke else "efficiency")
    rows = []
    for name in args.variants:
        what, overrides = VARIANTS[name]
        student = work_dir / name
        start = time.perf_counter()
        results = run_app(RECIPE, root, [*common, *overrides, f"distill.out_dir={student}", "~evaluate.systems",
                                         f"+evaluate.systems={{student:['{student}/student.ckpt']}}",
                                         f"evaluate.out_dir={student}/evaluate"], work_dir / "runs" / name)["results"]
        distill = results["distill"]
        rows.append({"name": name, "what": what, "val": [100 * p["mAP"] for p in distill["val_history"]],
                     "mAP": 100 * results["evaluate"]["systems"]["student"]["mAP"],
                     "seconds": distill["train_seconds"], "steps": distill["steps"],
                     "wall": time.perf_counter() - start})
        row = rows[-1]
        print(f"{name:<18} val {' '.join(f'{v:.1f}' for v in row['val'])}  eval {row['mAP']:.2f}  "
              f"{row['seconds']:.0f} s ({row['seconds'] / row['steps']:.3f} s/step)", flush=True)

    print(f"\n{cfg.distill.model.name} students, {epochs} epochs at batch {cfg.data.batch_size}, seed {cfg.seed}, "
          f"store {cfg.store.path}")
    print("| variant | what | val mAP after each epoch | eval mAP | train s | s/step |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['what']} | {', '.join(f'{v:.1f}' for v in row['val'])} | {row['mAP']:.2f} | "
              f"{row['seconds']:.0f} | {row['seconds'] / row['steps']:.3f} |")


if __name__ == "__main__":
    main()
