"""mAP / mAUC / d-prime against cases computed by hand, and the per-class CSV."""

import csv
import math
from statistics import NormalDist

import numpy as np
import pytest

from ced_train.metrics import d_prime, tagging_metrics, write_per_class_csv

# 4 clips x 3 classes; class 2 has no positive clip, so it is left out of mAP and mAUC.
TARGETS = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
SCORES = np.array([[0.9, 0.2, 0.5], [0.8, 0.4, 0.1], [0.3, 0.6, 0.7], [0.1, 0.1, 0.2]])


def test_map_matches_hand_computed_average_precision():
    metrics = tagging_metrics(TARGETS, SCORES)
    # class 0: ranking pos, neg, pos, neg -> precisions 1/1 and 2/3 at the positives -> AP 5/6
    # class 1: ranking neg(0.6), pos(0.4) -> AP 1/2
    assert metrics.ap[0] == pytest.approx(5 / 6)
    assert metrics.ap[1] == pytest.approx(1 / 2)
    assert math.isnan(metrics.ap[2])
    assert metrics.mAP == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert metrics.num_classes_scored == 2
    assert metrics.num_clips == 4


def test_mauc_and_d_prime_match_hand_computed_pairs():
    metrics = tagging_metrics(TARGETS, SCORES)
    # class 0: 3 of 4 (positive, negative) pairs ordered right; class 1: 2 of 3
    assert metrics.auc[0] == pytest.approx(3 / 4)
    assert metrics.auc[1] == pytest.approx(2 / 3)
    expected_mauc = (3 / 4 + 2 / 3) / 2
    assert metrics.mAUC == pytest.approx(expected_mauc)
    assert metrics.d_prime == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(expected_mauc))


def test_class_with_only_positives_counts_for_map_not_for_mauc():
    targets = np.array([[1, 1], [1, 0]])
    scores = np.array([[0.2, 0.9], [0.1, 0.3]])
    metrics = tagging_metrics(targets, scores)
    assert metrics.ap[0] == pytest.approx(1.0)
    assert math.isnan(metrics.auc[0])
    assert metrics.mAUC == pytest.approx(1.0)
    assert metrics.d_prime == math.inf


def test_perfect_and_chance_d_prime():
    assert d_prime(0.5) == pytest.approx(0.0)
    assert d_prime(1.0) == math.inf
    assert math.isnan(d_prime(math.nan))


def test_shape_mismatch_and_no_positives_raise():
    with pytest.raises(ValueError, match="shape"):
        tagging_metrics(TARGETS, SCORES[:, :2])
    with pytest.raises(ValueError, match="no class has a positive"):
        tagging_metrics(np.zeros((3, 2)), np.ones((3, 2)))


def test_per_class_csv_lists_display_names_best_first(tmp_path):
    metrics = tagging_metrics(TARGETS, SCORES)
    path = write_per_class_csv(tmp_path / "ap.csv", metrics, ["Speech", "Music", "Dog"])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["display_name"] for row in rows] == ["Speech", "Music", "Dog"]
    assert float(rows[0]["ap"]) == pytest.approx(5 / 6)
    assert rows[0]["positives"] == "2"
    assert rows[2]["ap"] == "" and rows[2]["auc"] == ""


def test_evaluate_scores_official_lightning_and_exported_checkpoints_alike(synthetic_train_shards, tmp_path, capsys):
    """One network saved as an official file (mean pooling: probabilities), as a Lightning checkpoint and as this
    project's export (logit pooling: sigmoid applied by evaluate) scores the same; several files form an ensemble."""
    import torch

    from ced_train.__main__ import compose, run_stages
    from ced_train.lightning.fit import export_model
    from ced_train.lightning.losses import LabelBCE
    from ced_train.lightning.module import TaggerModule
    from ced_train.models import create_model

    torch.manual_seed(0)
    model = create_model("ced_test", pooling="logit")
    weights = model.state_dict()
    torch.save({"model": weights}, tmp_path / "official.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()},
                "ced_model": {"name": "ced_test", "num_classes": 527, "pooling": "logit"}}, tmp_path / "last.ckpt")
    export_model(tmp_path / "export.ckpt", TaggerModule(model, "ced_test", LabelBCE(), torch.optim.AdamW), {})
    torch.manual_seed(1)
    torch.save({"model": create_model("ced_test").state_dict()}, tmp_path / "other.pt")
    cfg = compose(["~local", 
        "stages=[evaluate]", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
        f"evaluate.shards={synthetic_train_shards}", f"evaluate.checkpoint={tmp_path}/official.pt",
        f"+evaluate.systems.lightning=[{tmp_path}/last.ckpt]", f"+evaluate.systems.export=[{tmp_path}/export.ckpt]",
        f"+evaluate.systems.pair=[{tmp_path}/official.pt,{tmp_path}/other.pt]", "evaluate.baseline_shards=null",
    ])
    systems = run_stages(cfg)[0]["evaluate"]["systems"]
    assert systems["official"]["mAP"] == pytest.approx(systems["lightning"]["mAP"], abs=1e-6)
    assert systems["export"]["mAP"] == pytest.approx(systems["lightning"]["mAP"], abs=1e-6)
    assert systems["official"]["num_clips"] == 21 and systems["pair"]["checkpoints"][1].endswith("other.pt")
    assert systems["pair"]["mAP"] != pytest.approx(systems["official"]["mAP"], abs=1e-6)
    assert "baseline_logreg" not in systems  # baseline_shards=null leaves the baseline out
    table = capsys.readouterr().out
    assert all(name in table for name in ("official", "lightning", "export", "pair"))
    assert (tmp_path / "run" / "evaluate" / "pair_per_class.csv").is_file()
