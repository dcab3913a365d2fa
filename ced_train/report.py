"""`results.md` beside a run's `results.json`: the evaluate table, the run's settings and timings, and two plots
(PNG, matplotlib without a display): validation mAP per epoch of every trained network, and per-class AP of the
student against the ensemble. A run with some stages only gets the parts its results hold, and says what is missing.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from statistics import fmean

REPORT_NAME = "results.md"
VAL_PLOT = "val_map.png"
PER_CLASS_PLOT = "per_class_ap.png"
LABELLED_GAPS = 20  # per-class plot: classes named, those where student and ensemble differ most


def write_report(payload: dict, run_dir: str | Path) -> list[Path]:
    """Write `results.md` and the plots that `payload` (the content of results.json) has data for into `run_dir`;
    return the paths written, results.md first."""
    run_dir = Path(run_dir)
    results = payload["results"]
    written = []
    sections = [f"# Run `{payload['name']}`", "", f"Stages: {' → '.join(payload['stages'])}. "
                f"Run directory: `{payload['run_dir']}`.", ""]
    sections += ["## Evaluation", ""]
    if "evaluate" in results:
        sections += [f"On `{results['evaluate']['shards']}`; mAP, mAUC in %.", "",
                     markdown_table(results["evaluate"]["systems"]), ""]
    else:
        sections += ["No evaluate stage in this run.", ""]

    sections += ["## Plots", ""]
    histories = val_histories(results)
    if histories:
        written.append(plot_val_histories(histories, run_dir / VAL_PLOT))
        sections += [f"![validation mAP per epoch]({VAL_PLOT})", ""]
    else:
        sections += ["Validation mAP per epoch: not plotted, no train or distill stage with a validation history.", ""]
    systems = results.get("evaluate", {}).get("systems", {})
    if "student" in systems and "ensemble" in systems:
        written.append(plot_per_class(systems["student"]["per_class_csv"], systems["ensemble"]["per_class_csv"],
                                      run_dir / PER_CLASS_PLOT))
        sections += [f"![per-class AP, student against ensemble]({PER_CLASS_PLOT})", ""]
    else:
        missing = [name for name in ("student", "ensemble") if name not in systems]
        sections += [f"Per-class AP of student against ensemble: not plotted, evaluate scored no "
                     f"{' and no '.join(f'`{name}`' for name in missing)} system.", ""]

    sections += ["## Settings", "", "| setting | value |", "| --- | --- |"]
    sections += [f"| `{key}` | {_setting(value)} |" for key, value in payload.get("settings", {}).items()]
    sections += ["", "## Timings", "", "| stage | seconds |", "| --- | ---: |"]
    sections += [f"| {stage} | {seconds:.1f} |" for stage, seconds in payload["seconds"].items()]

    path = run_dir / REPORT_NAME
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text("\n".join(sections) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return [path, *written]


def markdown_table(systems: dict[str, dict]) -> str:
    """Evaluate's systems (name → scores) as a markdown table: mAP and mAUC in %, d-prime, clips."""
    lines = ["| system | mAP | mAUC | d-prime | clips |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {100 * s['mAP']:.2f} | {100 * s['mAUC']:.2f} | {s['d_prime']:.3f} | {s['num_clips']} |"
              for name, s in systems.items()]
    return "\n".join(lines)


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return "<br>".join(f"`{item}`" for item in value) or "(none)"
    return f"`{value}`"


def val_histories(results: dict) -> dict[str, list[dict]]:
    """Network name → its `{"epoch", "step", "mAP"}` validation runs: train members as `member<i>`, the student as
    `student`; networks without any (exports made before histories were kept) are left out."""
    histories = {f"member{i}": member.get("val_history") for i, member in
                 enumerate(results.get("train", {}).get("members", []))}
    histories["student"] = results.get("distill", {}).get("val_history")
    return {name: history for name, history in histories.items() if history}


def plot_val_histories(histories: dict[str, list[dict]], path: Path) -> Path:
    """One line per network: validation mAP (%) against epochs trained."""
    from matplotlib.figure import Figure  # slow to import; without pyplot no display or global state is involved
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for name, history in histories.items():
        axes.plot([point["epoch"] + 1 for point in history], [100 * point["mAP"] for point in history], marker="o",
                  linestyle="--" if name.startswith("member") else "-", label=name)
    axes.set(xlabel="epochs trained", ylabel="validation mAP (%)", title="Validation mAP per epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    return path


def read_per_class(path: str | Path) -> dict[str, float]:
    """Display name → AP of a per-class CSV (`metrics.write_per_class_csv`), classes with an AP only."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["display_name"]: float(row["ap"]) for row in csv.DictReader(handle) if row["ap"]}


def plot_per_class(student_csv: str | Path, ensemble_csv: str | Path, path: Path) -> Path:
    """Per-class AP (%) of the student against the ensemble's, one point per class, the diagonal for equal AP; the
    `LABELLED_GAPS` classes farthest from it are named."""
    from matplotlib.figure import Figure

    student, ensemble = read_per_class(student_csv), read_per_class(ensemble_csv)
    names = [name for name in ensemble if name in student]
    x = [100 * ensemble[name] for name in names]
    y = [100 * student[name] for name in names]
    figure = Figure(figsize=(7, 7), layout="constrained")
    axes = figure.subplots()
    axes.plot([0, 100], [0, 100], color="grey", linewidth=1, label="equal AP")
    axes.scatter(x, y, s=18, zorder=3)
    for i in sorted(range(len(names)), key=lambda i: -abs(y[i] - x[i]))[:LABELLED_GAPS]:
        right = x[i] > 70  # named on the left, inside the axes
        axes.annotate(names[i], (x[i], y[i]), xytext=(-4 if right else 4, 2), textcoords="offset points",
                      ha="right" if right else "left", fontsize=7)
    axes.set(xlim=(0, 100), ylim=(0, 100), aspect="equal", xlabel="ensemble AP (%)", ylabel="student AP (%)",
             title=f"Per-class AP over {len(names)} classes (mean: ensemble {fmean(x):.1f}, student {fmean(y):.1f})")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=120)
    return path
