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
