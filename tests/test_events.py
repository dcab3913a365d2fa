import json
import math
from pathlib import Path

import numpy as np
import pytest

from ced_train.events import (
    OFF_FRACTION,
    Event,
    EventDetector,
    Thresholds,
    detect_events,
    read_events_tsv,
    tune_thresholds,
    write_events_tsv,
    write_truth_tsv,
)
from ced_train.sed_metrics import event_based, segment_based

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "sed_reference.json").read_text())
HOP_S, WINDOW_S = 0.5, 2.0


def reference_inputs():
    as_tuples = lambda side: {f: [tuple(e) for e in events] for f, events in REFERENCE[side].items()}  # noqa: E731
    return as_tuples("truth"), as_tuples("predicted"), REFERENCE["labels"]


def windows(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (s) of `count` 2 s windows every 0.5 s, growing from the stream's start."""
    ends_s = np.arange(1, count + 1) * HOP_S
    return np.maximum(0.0, ends_s - WINDOW_S), ends_s


def coverage(starts_s, ends_s, onset_s, offset_s) -> np.ndarray:
    """Fraction of each window that the sound [onset_s, offset_s] fills: a score a clip tagger would roughly give."""
    overlap = np.clip(np.minimum(ends_s, offset_s) - np.maximum(starts_s, onset_s), 0, None)
    return (overlap / (ends_s - starts_s)).astype(np.float32)


@pytest.mark.parametrize("config", sorted(REFERENCE["expected"]))
def test_metrics_equal_sed_eval_on_the_reference_fixture(config):
    truth, predicted, labels = reference_inputs()
    expected = REFERENCE["expected"][config]
    settings = dict(expected["settings"])
    metric = event_based if settings.pop("kind") == "event" else segment_based
    scores = metric(truth, predicted, labels, **settings)
    for got, want in ((scores.overall, expected["overall"]), *((scores.class_wise[label], expected["class_wise"][label])
                                                               for label in labels)):
        assert (got.tp, got.tp + got.fp, got.tp + got.fn) == (want["Ntp"], want["Nsys"], want["Nref"])
        assert got.f1 == pytest.approx(want["f_measure"], abs=1e-9)
        assert got.precision == pytest.approx(want["precision"], abs=1e-9)
        assert got.recall == pytest.approx(want["recall"], abs=1e-9)
    assert scores.class_average_f1 == pytest.approx(expected["class_average_f1"], abs=1e-9)
    if "error_rate" in expected["overall"]:
        assert scores.error_rate == pytest.approx(expected["overall"]["error_rate"], abs=1e-9)


def test_event_f1_depends_on_the_collar_and_the_offset_condition():
    truth, predicted, labels = reference_inputs()
    at_02 = event_based(truth, predicted, labels, t_collar=0.2).overall.f1
    assert at_02 == pytest.approx(REFERENCE["expected"]["event_onset_offset"]["overall"]["f_measure"], abs=1e-9)
    assert event_based(truth, predicted, labels, t_collar=0.5).overall.f1 > at_02 + 0.05
    assert event_based(truth, predicted, labels, evaluate_offset=False).overall.f1 > at_02 + 0.05


def test_event_matching_is_maximum_not_greedy():
    """sed_eval's 'greedy' matching pairs the first truth event with the first prediction that fits and leaves the
    second truth event unmatched; the default 'optimal' matching, and ours, pairs both."""
    truth, predicted, labels = reference_inputs()
    scores = event_based({"c": truth["clip_30.wav"]}, {"c": predicted["clip_30.wav"]}, labels)
    assert (scores.overall.tp, scores.overall.fp, scores.overall.fn) == (2, 0, 0)


def test_a_file_on_one_side_only_counts_as_empty_on_the_other():
    truth = {"a.wav": [(0.0, 1.0, "x")]}
    predicted = {"b.wav": [(2.0, 3.5, "x")]}
    for metric in (event_based, segment_based):
        counts = metric(truth, predicted, ["x", "y"]).class_wise
        assert (counts["x"].tp, counts["x"].fp, counts["x"].fn) == ((0, 1, 1) if metric is event_based else (0, 2, 1))
        assert math.isnan(counts["y"].precision) and math.isnan(counts["y"].f1)
    assert math.isnan(segment_based({}, predicted, ["x"]).error_rate)


def test_only_the_given_labels_are_scored_and_a_reversed_event_is_an_error_naming_the_file():
    truth = {"b.wav": [(0.0, 1.0, "x"), (2.0, 3.0, "z")]}
    predicted = {"b.wav": [(0.1, 0.9, "x"), (5.0, 6.0, "z")]}  # z, not scored, would be a miss and a false alarm
    for metric in (event_based, segment_based):
        scores = metric(truth, predicted, ["x", "y"])
        assert set(scores.class_wise) == {"x", "y"}
        assert (scores.overall.tp, scores.overall.fp, scores.overall.fn) == (1, 0, 0)
    with pytest.raises(ValueError, match=r"^b\.wav: event 'x' from 2\.0 s to 1\.0 s; expected 0 <= onset <= offset$"):
        segment_based({}, {"b.wav": [(2.0, 1.0, "x")]}, ["x"])


@pytest.mark.parametrize("median_hops", [1, 3, 5])
def test_online_pushes_equal_offline_detection(median_hops):
    rng = np.random.default_rng(median_hops)
    starts_s, ends_s = windows(300)
    periods = rng.uniform(10, 60, size=6)  # windows per cycle, plus noise: many crossings, spikes and dips
    logits = 3 * np.sin(2 * np.pi * np.arange(300)[:, None] / periods) + rng.normal(0, 1.0, size=(300, 6))
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    names = [f"class {i}" for i in range(6)]
    thresholds = Thresholds(np.linspace(0.4, 0.8, 6), np.linspace(0.2, 0.7, 6))
    detector, opened, closed = EventDetector(names, thresholds, median_hops), [], []
    for j in range(300):
        new_opened, new_closed = detector.push(starts_s[j], ends_s[j], probs[j])
        opened += new_opened
        closed += new_closed
        assert all(math.isnan(e.offset_s) and e.onset_s <= ends_s[j] for e in new_opened)
    closed += detector.close(ends_s[-1])
    offline = detect_events(starts_s, ends_s, probs, names, thresholds, median_hops)
    assert len(offline) > 30
    assert sorted(closed, key=lambda e: (e.onset_s, e.label)) == offline
    half, centres = median_hops // 2, (starts_s + ends_s) / 2  # close() decides the last `half` windows
    decided_by_close_s = (centres[-half - 1] + centres[-half]) / 2 if half else math.inf
    assert sorted((e.label, e.onset_s) for e in opened) == \
        sorted((e.label, e.onset_s) for e in offline if e.onset_s < decided_by_close_s)


@pytest.mark.parametrize("onset_s, offset_s", [(0.0, 4.0), (5.0, 12.0), (5.3, 9.1), (7.85, 11.6), (8.1, 15.9)])
def test_a_score_following_window_coverage_places_onsets_within_half_a_hop(onset_s, offset_s):
    """A score that crosses `on` = 0.5 at half coverage: onsets within half a hop; offsets too without hysteresis,
    and with off = 0.6 on late by the documented (on - off) x window = 0.4 s, give or take half a hop."""
    starts_s, ends_s = windows(40)
    probs = np.stack([coverage(starts_s, ends_s, onset_s, offset_s), np.zeros(40, np.float32)], axis=1)
    for thresholds, late_s in ((Thresholds.uniform(2, 0.5, off=0.5), 0.0), (Thresholds.uniform(2, 0.5), 0.4)):
        (event,) = detect_events(starts_s, ends_s, probs, ["on", "never"], thresholds)
        assert (event.label, event.score) == ("on", 1.0)
        assert abs(event.onset_s - onset_s) <= HOP_S / 2
        assert abs(event.offset_s - offset_s - late_s) <= HOP_S / 2 + 1e-9


def test_event_times_follow_the_span_rule():
    """Windows 0..19 end every 0.5 s; window j's centre is (max(0, end - 2) + end) / 2, its span runs between the
    midpoints of neighbouring centres. A score high on windows 8..13 (median_hops=1) spans 8's start to 13's end."""
    starts_s, ends_s = windows(20)
    probs = np.zeros((20, 1), np.float32)
    probs[8:14] = 0.9
    (event,) = detect_events(starts_s, ends_s, probs, ["x"], Thresholds.uniform(1), median_hops=1)
    centres = (starts_s + ends_s) / 2
    assert (event.onset_s, event.offset_s) == ((centres[7] + centres[8]) / 2, (centres[13] + centres[14]) / 2)
    assert (event.onset_s, event.offset_s) == (3.25, 6.25)


def test_hysteresis_keeps_one_event_through_a_dip_between_off_and_on():
    starts_s, ends_s = windows(30)
    probs = np.full((30, 1), 0.05, np.float32)
    probs[5:25] = 0.9
    probs[13:16] = 0.4  # three windows: longer than the median filter removes
    with_gap = detect_events(starts_s, ends_s, probs, ["x"], Thresholds(np.array([0.5]), np.array([0.3])))
    without_gap = detect_events(starts_s, ends_s, probs, ["x"], Thresholds(np.array([0.5]), np.array([0.5])))
    assert len(with_gap) == 1 and with_gap[0].score == pytest.approx(0.9)
    assert len(without_gap) == 2 and without_gap[0].offset_s < without_gap[1].onset_s


def test_the_median_filter_removes_a_one_window_spike():
    starts_s, ends_s = windows(20)
    probs = np.full((20, 1), 0.1, np.float32)
    probs[10] = 0.95
    assert detect_events(starts_s, ends_s, probs, ["x"], Thresholds.uniform(1), median_hops=3) == []
    (spike,) = detect_events(starts_s, ends_s, probs, ["x"], Thresholds.uniform(1), median_hops=1)
    assert (spike.onset_s, spike.offset_s) == (4.25, 4.75)  # window 10: [3.5, 5.5] s


def test_memory_stays_bounded_over_a_long_stream():
    rng = np.random.default_rng(0)
    detector = EventDetector(["a", "b", "c"], Thresholds.uniform(3), median_hops=5)
    probs = rng.random((10_000, 3), dtype=np.float32)
    for j in range(10_000):
        detector.push(j * HOP_S, j * HOP_S + WINDOW_S, probs[j])
        assert len(detector._windows) <= 5
    assert detector.close(9_999 * HOP_S + WINDOW_S) is not None and len(detector._windows) == 0


def test_close_ends_open_events_at_the_stream_end_and_resets():
    starts_s, ends_s = windows(12)
    detector = EventDetector(["x", "y"], Thresholds.uniform(2), median_hops=3)
    for j in range(12):
        detector.push(starts_s[j], ends_s[j], np.array([0.1, 0.8 if j >= 6 else 0.1], np.float32))
    (event,) = detector.close(6.0)
    assert (event.label, event.index, event.onset_s, event.offset_s) == ("y", 1, 2.25, 6.0)
    assert detector.push(0.0, 0.5, np.array([0.9, 0.1]))[0] == [] and detector.close(0.5)[0].onset_s == 0.0
    detector.push(0.0, 2.0, np.array([0.9, 0.1]))
    with pytest.raises(ValueError, match="before the centre of the last window"):
        detector.close(0.5)


def test_thresholds_file_round_trips_and_fills_defaults(tmp_path):
    names = ["Siren", "Dial tone", "Beep, bleep"]
    thresholds = Thresholds(np.array([0.123456789, 0.7, 0.35]), np.array([0.1, 0.7, 0.0]))
    thresholds.write(tmp_path / "t.tsv", names)
    read = Thresholds.read(tmp_path / "t.tsv", names)
    assert read.on.tobytes() == thresholds.on.tobytes() and read.off.tobytes() == thresholds.off.tobytes()
    assert (tmp_path / "t.tsv").read_text().splitlines()[:2] == ["label\ton\toff", "Siren\t0.12345679\t0.1"]
    (tmp_path / "on_only.tsv").write_text("label\ton\nDial tone\t0.8\n")
    partial = Thresholds.read(tmp_path / "on_only.tsv", names, default_on=0.4)
    np.testing.assert_array_equal(partial.on, np.float32([0.4, 0.8, 0.4]))
    np.testing.assert_allclose(partial.off, [0.4 * OFF_FRACTION, 0.8 * OFF_FRACTION, 0.4 * OFF_FRACTION], rtol=1e-6)
    assert partial.off[[0, 2]].tobytes() == Thresholds.uniform(2, 0.4).off.tobytes()  # one rule, the same bits
    (tmp_path / "dial.tsv").write_text("label\ton\nDial tone\t0.4\n")
    assert Thresholds.read(tmp_path / "dial.tsv", names).off[1] == Thresholds.uniform(3, 0.4).off[1]


def test_thresholds_file_with_an_unknown_label_is_a_one_line_error(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("label\ton\toff\nSiren\t0.5\t0.3\nSirene\t0.5\t0.3\n")
    with pytest.raises(ValueError) as error:
        Thresholds.read(path, ["Siren", "Hum"])
    assert str(error.value) == f"{path}:3: label 'Sirene' is not one of the 2 class names"
    path.write_text("label\ton\toff\nSiren\t0.3\t0.5\n")
    with pytest.raises(ValueError, match=r":2: 'Siren' has on 0.3, off 0.5; expected 0 <= off <= on <= 1$"):
        Thresholds.read(path, ["Siren", "Hum"])


def test_tune_thresholds_picks_a_threshold_between_score_levels_and_beats_a_bad_one():
    """Class 'loud' scores 0.8 inside its events and 0.15 outside; 'faint' 0.35 inside and 0.05 outside (a uniform
    0.5 never finds it); 'absent' has no truth and keeps the default."""
    rng = np.random.default_rng(3)
    names = ["loud", "faint", "absent"]
    window_scores, truth = [], []
    for _ in range(6):
        starts_s, ends_s = windows(40)
        events = []
        probs = np.zeros((40, 3), np.float32)
        for index, (inside, outside) in enumerate(((0.8, 0.15), (0.35, 0.05))):
            onset_s = float(rng.uniform(0, 12))
            offset_s = onset_s + float(rng.uniform(3, 7))
            events.append((onset_s, offset_s, names[index]))
            centres = (starts_s + ends_s) / 2
            probs[:, index] = np.where((centres >= onset_s) & (centres < offset_s), inside, outside)
        probs += rng.normal(0, 0.02, size=probs.shape).astype(np.float32)
        window_scores.append((starts_s, ends_s, np.clip(probs, 0, 1)))
        truth.append(events)
    tuned = tune_thresholds(window_scores, truth, names, default_on=0.42)
    assert 0.15 / OFF_FRACTION < tuned.on[0] <= 0.8 and 0.05 / OFF_FRACTION < tuned.on[1] <= 0.35
    assert tuned.on[2] == np.float32(0.42)
    np.testing.assert_allclose(tuned.off, tuned.on * OFF_FRACTION, rtol=1e-6)

    def segment_f1(thresholds):
        predicted = {f"{i}": [(e.onset_s, e.offset_s, e.label) for e in detect_events(*scores, names, thresholds)]
                     for i, scores in enumerate(window_scores)}
        return segment_based({f"{i}": t for i, t in enumerate(truth)}, predicted, names).overall.f1

    assert segment_f1(tuned) > 0.85 and segment_f1(tuned) > segment_f1(Thresholds.uniform(3, 0.5)) + 0.2


def test_events_tsv_round_trips_and_reads_dcase_truth(tmp_path):
    rows = [("a.wav", Event("Siren", 3, 0.25, 4.0004, 0.91)), ("b/c.flac", Event("Beep, bleep", 0, 1.5, 2.0, 0.5))]
    write_events_tsv(tmp_path / "pred.tsv", rows)
    lines = (tmp_path / "pred.tsv").read_text().splitlines()
    assert lines == ["filename\tonset\toffset\tevent_label\tscore", "a.wav\t0.250\t4.000\tSiren\t0.9100",
                     "b/c.flac\t1.500\t2.000\tBeep, bleep\t0.5000"]
    assert read_events_tsv(tmp_path / "pred.tsv") == {"a.wav": [(0.25, 4.0, "Siren")],
                                                      "b/c.flac": [(1.5, 2.0, "Beep, bleep")]}
    truth = {"x.wav": [(0.0, 1.25, "Hum"), (3.0, 9.5, "Ding")], "y.wav": [(2.0, 2.5, "Hum")]}
    write_truth_tsv(tmp_path / "truth.tsv", truth)
    assert read_events_tsv(tmp_path / "truth.tsv") == truth
    with pytest.raises(ValueError, match="still open"):
        write_events_tsv(tmp_path / "open.tsv", [("a.wav", Event("Siren", 3, 0.25, math.nan, 0.9))])
    assert not (tmp_path / "open.tsv").exists()


@pytest.mark.parametrize("line, problem", [("a.wav\t1.0\tHum", "3 tab-separated fields, expected 4"),
                                           ("a.wav\tsoon\t2.0\tHum", "could not convert"),
                                           ("a.wav\t3.0\t2.0\tHum", "onset 3.0, offset 2.0")])
def test_a_malformed_events_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "truth.tsv"
    path.write_text(f"filename\tonset\toffset\tevent_label\nb.wav\t0\t1\tHum\n{line}\n")
    with pytest.raises(ValueError, match=f"^{path}:3: .*{problem}"):
        read_events_tsv(path)
