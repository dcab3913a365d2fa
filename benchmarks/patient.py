"""The demo's student given the steps (recipe `tiny_distill_patient`: the demo's data and teachers, 32 stored views,
100 epochs of CED-Tiny from random weights). Measured in one run:

  run       `python -m ced_train +recipe=tiny_distill_patient OVERRIDES` in a subprocess (the real app: the demo's
            shards and teachers are reused when `make demo` made them, the 32-view store and the student when this
            benchmark made them with the same settings); its evaluate table on the eval split
  levels    the teachers, their ensemble and the logistic-regression baseline scored on the validation split too
            (`stages=[evaluate] evaluate.shards=${data.val_shards}`), the levels the student's validation curve
            is read against
  --fresh   also the same schedule with `distill.views=fresh` (fresh views against the same stored targets, the
            paper's consistency ablation), its own student directory

Prints the student's validation mAP per epoch beside those levels, the first validation at which it passes the
baseline and the ensemble − 3 line, its eval mAP against the ensemble's, and the wall time; plots the curves (with
the demo student's when its export is there) to `--out`. About 50 minutes per student on 2 CPU cores.

    python benchmarks/patient.py [--fresh] [--out patient_val_map.png] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _demo_app import recipe_config, run_app

from ced_train.lightning.fit import read_provenance

RECIPE = "tiny_distill_patient"
GAP = 3.0  # mAP points: the target is the ensemble's level less this


def first_epoch_at(history: list[dict], level: float) -> int | None:
    """Epochs trained at the first validation whose mAP (%) reaches `level`; None when none does."""
    return next((point["epoch"] + 1 for point in history if 100 * point["mAP"] >= level), None)


def plot(curves: dict[str, list[dict]], levels: dict[str, float], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.8), layout="constrained")
    axes = figure.subplots()
    for i, (name, history) in enumerate(curves.items()):
        axes.plot([p["epoch"] + 1 for p in history], [100 * p["mAP"] for p in history], color=f"C{i}", label=name,
                  marker="o" if len(history) < 10 else None)
    # (colour, line style, label above or below the line); the teachers one by one are printed, not drawn.
    styles = {"baseline_logreg": ("C3", "--", 2), "ensemble": ("black", "-", -9),
              f"ensemble − {GAP:.0f}": ("black", ":", -9)}
    for name, (color, style, offset) in styles.items():
        axes.axhline(levels[name], color=color, linestyle=style, linewidth=1.2)
        axes.annotate(f"{name} {levels[name]:.1f}", (0.0, levels[name]), xycoords=("axes fraction", "data"),
                      xytext=(4, offset), textcoords="offset points", fontsize=8, color=color)
    axes.set(xlabel="epochs trained", ylabel="validation mAP (%)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    parser.add_argument("--fresh", action="store_true", help="also distil with distill.views=fresh")
    parser.add_argument("--out", type=Path, default=Path("patient_val_map.png"), help="the plot (PNG)")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("CED_ROOT", Path.cwd())),
                        help="where data/ and runs/ go (default: CED_ROOT, else the current directory)")
    args = parser.parse_args()
    root = args.root.resolve()
    cfg = recipe_config(RECIPE, root, args.overrides)
    work_dir = Path(cfg.paths.artifacts_dir) / RECIPE / "benchmark"
    students = {"replay": []}
    if args.fresh:
        students["fresh"] = ["distill.views=fresh", f"distill.out_dir={cfg.distill.out_dir}_fresh"]

    curves, evaluated, seconds = {}, {}, {}
    for views, overrides in students.items():
        start = time.perf_counter()
        payload = run_app(RECIPE, root, [*args.overrides, *overrides], work_dir / "runs" / views)
        seconds[views] = time.perf_counter() - start
        curves[f"student, views={views} ({RECIPE})"] = payload["results"]["distill"]["val_history"]
        evaluated[views] = payload["results"]["evaluate"]["systems"]
        print(f"{views}: {seconds[views]:.0f} s (stages: "
              f"{', '.join(f'{k} {v:.0f} s' for k, v in payload['seconds'].items())})", flush=True)
    on_val = run_app(RECIPE, root, [*args.overrides, "stages=[evaluate]", "evaluate.shards=${data.val_shards}",
                                    f"evaluate.out_dir={work_dir}/val_levels"], work_dir / "runs" / "val_levels")
    val_systems = on_val["results"]["evaluate"]["systems"]
    levels = {name: 100 * system["mAP"] for name, system in val_systems.items() if name != "student"}
    levels[f"ensemble − {GAP:.0f}"] = levels["ensemble"] - GAP
    demo = read_provenance(Path(cfg.paths.artifacts_dir) / "tiny_distill" / "student" / "student.ckpt")
    if demo and demo.get("val_history"):
        curves[f"student of the demo (tiny_distill, {demo['epochs']} epochs)"] = demo["val_history"]

    print(f"\nvalidation split ({val_systems['ensemble']['num_clips']} clips): "
          + ", ".join(f"{name} {level:.2f}" for name, level in levels.items()))
    for name, history in curves.items():
        print(f"{name}: " + " ".join(f"{p['epoch'] + 1}:{100 * p['mAP']:.1f}" for p in history))
    for views in students:
        history = curves[f"student, views={views} ({RECIPE})"]
        print(f"views={views}: passes baseline_logreg ({levels['baseline_logreg']:.1f}) at epoch "
              f"{first_epoch_at(history, levels['baseline_logreg'])}, ensemble − {GAP:.0f} "
              f"({levels[f'ensemble − {GAP:.0f}']:.1f}) at epoch "
              f"{first_epoch_at(history, levels[f'ensemble − {GAP:.0f}'])} (None: never)")
    for views, systems in evaluated.items():
        student, ensemble = 100 * systems["student"]["mAP"], 100 * systems["ensemble"]["mAP"]
        verdict = "met" if student >= ensemble - GAP else "missed"
        print(f"eval split, views={views}: " + ", ".join(f"{name} {100 * s['mAP']:.2f}" for name, s in systems.items())
              + f"; student − ensemble {student - ensemble:+.2f} (target >= −{GAP:.0f}: {verdict})")
    if args.fresh:
        replay, fresh = 100 * evaluated["replay"]["student"]["mAP"], 100 * evaluated["fresh"]["student"]["mAP"]
        print(f"eval split: replay − fresh {replay - fresh:+.2f} mAP")
    plot(curves, levels, args.out, f"{RECIPE}: CED-Tiny from random weights, validation mAP "
         f"({val_systems['ensemble']['num_clips']} clips)")
    print(f"plot: {args.out.resolve()}")


if __name__ == "__main__":
    main()
