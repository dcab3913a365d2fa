"""results.md: the evaluate table in markdown, the plots its results have data for, and a line for each one that
they do not."""

import numpy as np

from ced_train.metrics import tagging_metrics, write_per_class_csv
from ced_train.report import PER_CLASS_PLOT, VAL_PLOT, markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCORES = {"mAP": 0.4567, "mAUC": 0.9012, "d_prime": 1.8345, "num_clips": 80, "num_classes_scored": 14}


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


def payload(results: dict, stages: list[str]) -> dict:
    return {"name": "handmade", "stages": stages, "run_dir": "/runs/handmade", "seconds": {"total": 12.34},
            "settings": {"seed": 0, "teachers.checkpoints": ["a.ckpt", "b.ckpt"]}, "results": results}


def test_markdown_table_has_a_row_per_system_with_map_and_mauc_in_percent():
    table = markdown_table({"student": SCORES, "baseline_logreg": {**SCORES, "mAP": 0.1}})
    lines = table.splitlines()
    assert lines[0] == "| system | mAP | mAUC | d-prime | clips |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: |"
    assert lines[2] == "| student | 45.67 | 90.12 | 1.835 | 80 |"
    assert lines[3] == "| baseline_logreg | 10.00 | 90.12 | 1.835 | 80 |"
    assert len(lines) == 4


def test_report_plots_student_against_ensemble_and_validation_histories(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.random((30, 4)) < 0.4
    systems = {}
    for name in ("ensemble", "student"):
        metrics = tagging_metrics(targets, rng.random((30, 4)))
        csv = write_per_class_csv(tmp_path / f"{name}.csv", metrics, ["Speech", "Music", "Dog", "Siren"])
        systems[name] = {**metrics.summary(), "checkpoints": [f"{name}.ckpt"], "per_class_csv": str(csv)}
    history = [{"epoch": 1, "step": 10, "mAP": 0.2}, {"epoch": 3, "step": 20, "mAP": 0.3}]
    results = {"train": {"members": [{"val_history": history}, {"val_history": history}]},
               "distill": {"val_history": history}, "evaluate": {"shards": "/shards/eval", "systems": systems}}
    written = write_report(payload(results, ["train", "distill", "evaluate"]), tmp_path)
    assert written == [tmp_path / "results.md", tmp_path / VAL_PLOT, tmp_path / PER_CLASS_PLOT]
    assert all(is_png(path) for path in written[1:])
    text = written[0].read_text()
    assert f"![validation mAP per epoch]({VAL_PLOT})" in text and f"]({PER_CLASS_PLOT})" in text
    assert markdown_table(systems) in text
    assert "| `teachers.checkpoints` | `a.ckpt`<br>`b.ckpt` |" in text and "| total | 12.3 |" in text


def test_report_of_a_run_without_training_or_student_says_what_it_could_not_plot(tmp_path):
    csv = tmp_path / "member0_per_class.csv"
    write_per_class_csv(csv, tagging_metrics(np.eye(3), np.eye(3)), ["a", "b", "c"])
    results = {"evaluate": {"shards": "/shards/eval",
                            "systems": {"ensemble": {**SCORES, "checkpoints": ["x"], "per_class_csv": str(csv)}}}}
    [path] = write_report(payload(results, ["evaluate"]), tmp_path)
    text = path.read_text()
    assert "| ensemble | 45.67 |" in text
    assert "Validation mAP per epoch: not plotted" in text
    assert "evaluate scored no `student` system" in text
    assert not list(tmp_path.glob("*.png"))
    [path] = write_report(payload({}, []), tmp_path)
    assert "No evaluate stage in this run." in path.read_text()
