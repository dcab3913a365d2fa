"""What consistency is worth: CED-Tiny students distilled from one teacher store with replayed views
(`distill.views=replay`) and with fresh views against the same targets (`distill.views=fresh`), over seeds, each
scored by mAP on the labelled eval shards. Measured in one run:

  store     the demo's (the tiny_distill recipe's `store.path`) when it was made with CED's augmentation
            (`augment=ced`: shift, masks and mixup); otherwise one made here from the demo's teachers with
            `stages=[teach] augment=ced` at `<work dir>/store_ced.h5`
  runs      per mode and seed, `python -m ced_train +recipe=tiny_distill stages=[distill,evaluate] distill.views=MODE
            seed=S` in a subprocess (the real app: its student is reused while its settings are unchanged), the
            recipe's schedule unless `--epochs`; only the student is evaluated

Prints the per-run table, mean ± std (over seeds, ddof 1) per mode and replay − fresh (target: >= 2 mAP), and writes
a plot (per-seed points, mean ± std bars). Needs the demo's shards and teachers (`make demo`) and matplotlib. About
5 minutes per run of the demo's schedule on 2 CPU cores; `--smoke` (1 epoch of `ced_test` without warm-up, seed
0) checks the path.

    python benchmarks/consistency.py [--seeds 0 1 2] [--epochs N] [--out consistency.png] [--smoke] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _demo_app import recipe_config, require_demo, run_app
from hydra.utils import instantiate

from ced_train.store import TeacherStore

RECIPES = ("tiny_distill", "tiny_distill_patient")
MODES = ("replay", "fresh")
TARGET_MAP_POINTS = 2.0


def ced_store(recipe: str, root: Path, cfg, work_dir: Path, common: list[str]) -> Path:
    """A store of the demo's teachers made with `augment=ced`: the recipe's own when it is one, else one made here."""
    ced = instantiate(cfg.augment)  # cfg is composed with augment=ced
    recipe_store = Path(cfg.store.path)
    why = "absent"
    if recipe_store.is_file():
        with TeacherStore(recipe_store) as existing:
            differences = existing.spec.augment.differences(ced)
        if not differences:
            print(f"store: {recipe_store} (the recipe's, augment=ced)")
            return recipe_store
        why = "made with " + "; ".join(differences)
    store = work_dir / "store_ced.h5"
    print(f"store: {store}, made here with augment=ced (the recipe's {recipe_store} is {why})", flush=True)
    start = time.perf_counter()
    run_app(recipe, root, ["stages=[teach]", *common, f"store.path={store}", "teach.progress=false"],
            work_dir / "runs/teach")
    print(f"  teach: {time.perf_counter() - start:.0f} s", flush=True)
    return store


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation (ddof 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for x, mode in enumerate(MODES):
        values = [run["mAP"] for run in runs if run["mode"] == mode]
        mean, std = summary(values)
        ax.bar(x, mean, yerr=std, width=0.6, color=f"C{x}", alpha=0.35, capsize=6, label=f"{mode}: mean ± std")
        offsets = [0.12 * (i - (len(values) - 1) / 2) for i in range(len(values))]
        ax.scatter([x + o for o in offsets], values, color=f"C{x}", zorder=3, s=22)
    ax.set_xticks(range(len(MODES)), [f"distill.views={mode}" for mode in MODES])
    ax.set_ylabel("student mAP on the eval shards (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every run (e.g. trainer=cpu)")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                        help="the demo (8 epochs) or its patient schedule (100 epochs, 32 stored views)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="distill.trainer.max_epochs (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=Path("consistency.png"), help="the plot (PNG)")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("CED_ROOT", Path.cwd())),
                        help="where the demo's data/ and runs/ are (default: CED_ROOT, else the current directory)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="students, logs and a store made here (default: <artifacts>/tiny_distill/consistency)")
    parser.add_argument("--overwrite", action="store_true", help="retrain students even when their settings match")
    parser.add_argument("--smoke", action="store_true", help="check the path: 1 epoch of ced_test, seed 0")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401  (the plot comes last: fail before hours of training)
    except ImportError:
        sys.exit("consistency.py plots with matplotlib: pip install matplotlib")
    root = args.root.resolve()
    seeds, epochs = ([0], 1) if args.smoke else (args.seeds, args.epochs)

    cfg = recipe_config(args.recipe, root, ["augment=ced", *args.overrides])
    require_demo(cfg, root, "consistency.py")
    work_dir = (args.work_dir or Path(cfg.paths.artifacts_dir) / cfg.name / "consistency").resolve()
    common = ["augment=ced", "logger=csv", *args.overrides]
    store = ced_store(args.recipe, root, cfg, work_dir, common)

    schedule = []
    if epochs is not None:
        cadence = min(epochs, cfg.distill.trainer.check_val_every_n_epoch or epochs)
        schedule = [f"distill.trainer.max_epochs={epochs}", f"distill.trainer.check_val_every_n_epoch={cadence}"]
    if args.smoke:
        schedule += ["model@distill.model=ced_test", "distill.optim.scheduler.warmup_steps=0"]
    tag = "smoke" if args.smoke else f"epochs{epochs}" if epochs is not None else "recipe"
    runs = []
    for mode in MODES:
        for seed in seeds:
            name = f"{tag}/{mode}_seed{seed}"
            student = work_dir / name
            overrides = ["stages=[distill,evaluate]", *common, *schedule, f"store.path={store}",
                         f"distill.views={mode}", f"seed={seed}", f"distill.out_dir={student}",
                         f"distill.overwrite={str(args.overwrite).lower()}", "~evaluate.systems",
                         f"+evaluate.systems={{student:['{student}/student.ckpt']}}",
                         f"evaluate.out_dir={student}/evaluate"]
            start = time.perf_counter()
            results = run_app(args.recipe, root, overrides, work_dir / "runs" / name)["results"]
            scores = results["evaluate"]["systems"]["student"]
            runs.append({"mode": mode, "seed": seed, "mAP": 100 * scores["mAP"], "mAUC": 100 * scores["mAUC"],
                         "clips": scores["num_clips"], "epochs": results["distill"].get("epochs"),
                         "reused": results["distill"]["reused"], "seconds": time.perf_counter() - start})
            print(f"  {mode:<6} seed {seed}: mAP {runs[-1]['mAP']:6.2f}  ({runs[-1]['seconds']:.0f} s"
                  f"{', reused' if runs[-1]['reused'] else ''})", flush=True)

    print(f"\n{'ced_test (smoke)' if args.smoke else cfg.distill.model.name} students from {store}, "
          f"scored on {cfg.evaluate.shards} ({runs[0]['clips']} clips)")
    print(f"{'views':<7} {'seed':>4} {'mAP':>7} {'mAUC':>7} {'epochs':>6} {'seconds':>8}")
    for run in runs:
        print(f"{run['mode']:<7} {run['seed']:>4} {run['mAP']:7.2f} {run['mAUC']:7.2f} {run['epochs'] or '-':>6} "
              f"{run['seconds']:8.0f}{'  (reused)' if run['reused'] else ''}")
    means = {}
    for mode in MODES:
        means[mode], std = summary([run["mAP"] for run in runs if run["mode"] == mode])
        print(f"{mode:<7} mean {means[mode]:6.2f} ± {std:.2f} mAP over {len(seeds)} seed(s)")
    difference = means["replay"] - means["fresh"]
    verdict = "met" if difference >= TARGET_MAP_POINTS else "missed"
    print(f"replay - fresh: {difference:+.2f} mAP (target >= +{TARGET_MAP_POINTS:.0f}: {verdict}); "
          f"replay / fresh: {means['replay'] / means['fresh']:.3f}")
    plot(runs, args.out, f"{args.recipe}: replay - fresh = {difference:+.2f} mAP, {len(seeds)} seed(s), "
         f"{runs[0]['clips']} eval clips")
    print(f"plot: {args.out.resolve()}")


if __name__ == "__main__":
    main()
