import csv
import hashlib
import json

import numpy as np
import pytest
import soundfile

from ced_train.events import read_events_tsv
from ced_train.labels import default_label_file, load_class_labels
from data_prep.synthetic import GENERATORS, main

CLASSES = load_class_labels()


def content_hashes(root):
    """Bytes of text files, decoded samples of audio: libsndfile stamps random OGG serials and WAV PEAK times."""
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            data = soundfile.read(path, dtype="float32")[0].tobytes()
        except soundfile.SoundFileError:
            data = path.read_bytes()
        hashes[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return hashes


def test_layout_is_audioset_with_the_full_label_file_and_real_mids(synthetic_audioset):
    root = synthetic_audioset
    assert (root / "class_labels_indices.csv").read_bytes() == default_label_file().read_bytes()
    info = json.loads((root / "synthetic.json").read_text())
    assert len(info["classes"]) == len(GENERATORS) == 14
    for entry in info["classes"]:
        assert CLASSES.names[CLASSES.index_of_mid[entry["mid"]]] == entry["name"] and entry["index"] < 527

    for csv_name, size in (("balanced_train_segments.csv", 24), ("eval_segments.csv", 12)):
        lines = (root / csv_name).read_text().splitlines()
        assert [line[:1] for line in lines[:3]] == ["#"] * 3
        assert lines[2] == "# YTID, start_seconds, end_seconds, positive_labels"
        rows = [next(csv.reader([line], skipinitialspace=True)) for line in lines[3:]]
        assert len(rows) == size and all(len(r) == 4 and len(r[0]) == 11 for r in rows)
        assert all(line.endswith('"') and ', "' in line for line in lines[3:])  # quoted label field
        assert all(float(end) > float(start) for _, start, end, _ in rows)
        mids = [r[3].split(",") for r in rows]
        assert {m for row in mids for m in row} <= {c["mid"] for c in info["classes"]}
        assert max(len(row) for row in mids) >= 2  # multi-label


def test_files_mix_formats_rates_channels_naming_and_defects(synthetic_audioset):
    rows = [r for split in json.loads((synthetic_audioset / "synthetic.json").read_text())["rows"].values()
            for r in split]
    present = [r for r in rows if r["defect"] is None]
    assert {r["format"].split("/")[0] for r in present} >= {"wav", "flac", "ogg", "mp3"}
    assert len({r["sample_rate"] for r in present}) >= 3 and {r["channels"] for r in present} == {1, 2}
    assert any(r["end_s"] - r["start_s"] < 10 for r in present)
    assert any(r["file"].startswith("part-1/") for r in present) and any("/" not in r["file"] for r in present)
    assert {r["defect"] for r in rows} == {None, "missing", "corrupt", "empty"}
    for split in ("balanced_train", "eval"):
        for r in json.loads((synthetic_audioset / "synthetic.json").read_text())["rows"][split]:
            path = synthetic_audioset / "audio" / split / (r["file"] or "")
            if r["defect"] == "missing":
                assert r["file"] is None
            elif r["defect"] is None:
                info = soundfile.info(path)
                assert (info.samplerate, info.channels) == (r["sample_rate"], r["channels"])
                assert set(r["labels"]) == {e["class"] for e in r["events"]}


def test_events_tsv_holds_the_events_of_the_readable_files(synthetic_audioset):
    rows = json.loads((synthetic_audioset / "synthetic.json").read_text())["rows"]
    for split in ("balanced_train", "eval"):
        lines = (synthetic_audioset / f"{split}_events.tsv").read_text().splitlines()
        assert lines[0] == "filename\tonset\toffset\tevent_label"
        expected = {r["file"]: sorted((e["onset_s"], round(e["onset_s"] + e["duration_s"], 3), e["class"])
                                      for e in r["events"]) for r in rows[split] if r["defect"] is None}
        assert len(expected) == len(rows[split]) - 3  # one missing, one corrupt, one empty file per split
        events = read_events_tsv(synthetic_audioset / f"{split}_events.tsv")
        assert events == expected and all((synthetic_audioset / "audio" / split / f).is_file() for f in events)
        assert all(0 <= onset < offset <= 10 for file_events in events.values() for onset, offset, _ in file_events)


def test_same_seed_gives_identical_content_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert main(["--out", str(tmp_path / name), "--train", "10", "--eval", "0", "--seed", str(seed),
                     "--workers", "1"]) == 0
    assert content_hashes(tmp_path / "a") == content_hashes(tmp_path / "b")
    assert (tmp_path / "a" / "balanced_train_segments.csv").read_text() != \
        (tmp_path / "c" / "balanced_train_segments.csv").read_text()


def test_cli_keeps_an_equal_dataset_and_refuses_to_replace_without_overwrite(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert main(["--out", out, "--train", "4", "--eval", "0", "--workers", "1"]) == 0
    assert main(["--out", out, "--train", "4", "--eval", "0", "--workers", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["--out", out, "--train", "5", "--eval", "0", "--workers", "1"]) == 2
    assert main(["--out", out, "--train", "5", "--eval", "0", "--workers", "1", "--overwrite"]) == 0
    assert len((tmp_path / "syn" / "balanced_train_segments.csv").read_text().splitlines()) == 3 + 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    assert main(["--out", str(tmp_path / "other"), "--overwrite", "--workers", "1"]) == 2
    assert (tmp_path / "other" / "precious.txt").exists()


def band_features(waveform: np.ndarray, rate: int = 16000) -> np.ndarray:
    """Per log-spaced band: mean, spread, peak and frame-to-frame change of log power (a crude log-mel summary)."""
    frames = np.lib.stride_tricks.sliding_window_view(waveform, 512)[::160] * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.searchsorted(np.fft.rfftfreq(512, 1 / rate), np.geomspace(40, 8000, 49))
    band_power = [power[:, a : max(b, a + 1)].sum(axis=1) for a, b in zip(edges[:-1], edges[1:])]
    bands = np.log10(np.stack(band_power, axis=1) + 1e-10)
    bands -= bands.max()
    return np.concatenate([bands.mean(0), bands.std(0), bands.max(0), np.abs(np.diff(bands, axis=0)).mean(0)])


def test_classes_are_separable_by_a_linear_model_on_band_energies():
    """A stand-in for "learnable from a log-mel": ridge regression on simple band features, fit on 8 renders per
    class, must name the class of 4 unseen renders each (other seeds, so other frequencies, rates and timings)."""
    names, rate = list(GENERATORS), 16000
    features = np.array([band_features(GENERATORS[name](np.random.default_rng(seed), 2 * rate, rate))
                         for name in names for seed in range(12)])
    classes = np.repeat(np.arange(len(names)), 12)
    train = np.tile(np.arange(12) < 8, len(names))
    assert np.isfinite(features).all()
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    design = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    targets = np.eye(len(names))[classes]
    weights = np.linalg.solve(design[train].T @ design[train] + np.eye(design.shape[1]),
                              design[train].T @ targets[train])
    predicted = (design[~train] @ weights).argmax(axis=1)
    wrong = [(names[t], names[p]) for t, p in zip(classes[~train], predicted) if t != p]
    assert len(wrong) <= 1, wrong


@pytest.mark.parametrize("name, low_hz, high_hz", [("Hum", 45, 65), ("Dial tone", 340, 450),
                                                   ("Busy signal", 470, 630), ("Sine wave", 2000, 5000)])
def test_steady_tones_sit_in_their_frequency_bands(name, low_hz, high_hz):
    waveform = GENERATORS[name](np.random.default_rng(1), 32000, 16000)
    spectrum = np.abs(np.fft.rfft(waveform))
    assert low_hz <= np.fft.rfftfreq(len(waveform), 1 / 16000)[spectrum.argmax()] <= high_hz
