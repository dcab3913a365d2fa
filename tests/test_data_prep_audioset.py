import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ced_train.audio import SAMPLE_RATE
from ced_train.data import iter_shard, read_manifest, read_skipped
from ced_train.data.shards import encode_audio
from ced_train.labels import load_class_labels
from data_prep.audioset import AudioIndex, candidate_stems, main, read_segments
from data_prep.sharding import MALFORMED, ShardingError, SourceRow, build_shards

CLASSES = load_class_labels()
HEADER = ("# Segments csv created Sun Mar  5 10:54:31 2017\n"
          "# num_ytids=3, num_segs=3, num_unique_labels=2, num_positive_labels=3\n"
          "# YTID, start_seconds, end_seconds, positive_labels\n")


def csv_rows(path: Path) -> dict[str, tuple[str, float, float, list[str]]]:
    """Rows of an official segment CSV by `name:line`, parsed independently of the code under test."""
    rows = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("#") or not line.strip():
            continue
        ytid, start, end, mids = next(csv.reader([line], skipinitialspace=True))
        rows[f"{path.name}:{line_no}"] = (ytid, float(start), float(end), mids.split(","))
    return rows


def write_tone(path: Path, seconds=1.0, rate=SAMPLE_RATE, channels=1, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)
    soundfile.write(path, np.stack([frames] * channels, axis=1), rate, format=fmt)


def build(inputs, out, **kwargs):
    options = dict(tool="data_prep.audioset", labelled=True, samples_per_shard=8, workers=1, progress=False)
    return build_shards(inputs, out, CLASSES, **{**options, **kwargs})


def test_csv_rows_become_clips_or_skips_with_reasons(tmp_path):
    audio = tmp_path / "audio"
    for name in ("aaaaaaaaaaa_30.000.wav", "bbbbbbbbbbb_0_10.flac", "sub/ccccccccccc.ogg", "Yddddddddd-_12.500.wav",
                 "eeeeeeeeeee_20.wav", "eeeeeeeeeee_20.mp3", "hhhhhhhhhhh_5.000.txt"):
        if name.endswith(".txt"):
            (audio / name).write_text("not audio")
        else:
            write_tone(audio / name)
    (tmp_path / "seg.csv").write_text(HEADER + "\n".join([
        'aaaaaaaaaaa, 30.000, 40.000, "/m/09x0r,/t/dd00088"',   # 4: YTID_start.000
        'bbbbbbbbbbb, 0.000, 10.000, "/m/09x0r"',               # 5: YTID_start_end, integer spelling
        'ccccccccccc, 170.000, 180.000, "/m/0hdsk"',            # 6: YTID only, in a subdirectory
        'ddddddddd-, 12.500, 22.500, "/m/0hdsk"',               # 7: Y prefix, fractional start
        'eeeeeeeeeee, 20.000, 30.000, "/m/0hdsk"',              # 8: two formats: prefer the lossless one
        'fffffffffff, 0.000, 10.000, "/m/09x0r"',               # 9: no file
        'ggggggggggg, 0.000, 10.000, "/m/notaclass,/m/09x0r"',  # 10: unknown MID
        'aaaaaaaaaaa, 30.000, 40.000, "/m/09x0r"',              # 11: same segment twice
        'hhhhhhhhhhh, 5.000, ten, "/m/09x0r"',                  # 12: malformed time
        'only, two',                                            # 13: malformed row
        'hhhhhhhhhhh, 5.000, 15.000, "/m/09x0r"',               # 14: only a .txt with that name
    ]) + "\n")

    entries = read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES)

    by_line = {int(e.source_row.split(":")[1]): e for e in entries}
    assert sorted(by_line) == list(range(4, 15))
    clips = {line: e for line, e in by_line.items() if isinstance(e, SourceRow)}
    assert {line: e.source_file for line, e in clips.items()} == {
        4: "aaaaaaaaaaa_30.000.wav", 5: "bbbbbbbbbbb_0_10.flac", 6: "sub/ccccccccccc.ogg",
        7: "Yddddddddd-_12.500.wav", 8: "eeeeeeeeeee_20.wav"}
    assert clips[4].key == "aaaaaaaaaaa_30000" and clips[7].key == "ddddddddd-_12500"
    assert clips[4].labels == (0, CLASSES.index_of_mid["/t/dd00088"]) and clips[4].mids == ("/m/09x0r", "/t/dd00088")
    assert clips[7].extra == {"ytid": "ddddddddd-", "start_s": 12.5, "end_s": 22.5}
    reasons = {line: e.reason for line, e in by_line.items() if line not in clips}
    assert reasons == {9: "missing", 10: "unknown label", 11: "duplicate", 12: "malformed row",
                       13: "malformed row", 14: "missing"}
    assert "/m/notaclass" in by_line[10].detail and "seg.csv:4" in by_line[11].detail


def test_candidate_names_cover_the_common_spellings():
    stems = candidate_stems("abc", 30.0, 40.0)
    for stem in ("abc_30.000", "abc_30", "abc_30.0", "abc_30000", "abc_30.000_40.000", "abc_30_40", "abc",
                 "Yabc", "Yabc_30.000_40.000"):
        assert stem in stems
    assert stems.index("abc_30.000_40.000") < stems.index("abc_30.000") < stems.index("abc")
    assert {"abc_12.340", "abc_12.34", "abc_12340"} <= set(candidate_stems("abc", 12.34, 22.34))
    assert "abc_12.3" not in candidate_stems("abc", 12.34, 22.34)


def test_synthetic_split_every_row_accounted_with_csv_labels_and_source_durations(synthetic_audioset,
                                                                                   synthetic_train_shards):
    csv_path = synthetic_audioset / "balanced_train_segments.csv"
    rows = csv_rows(csv_path)
    truth = {(r["ytid"], r["start_s"]): r for r in
             json.loads((synthetic_audioset / "synthetic.json").read_text())["rows"]["balanced_train"]}
    manifest = read_manifest(synthetic_train_shards)
    skips = read_skipped(synthetic_train_shards)
    clips = [clip for shard in manifest.shards for clip in iter_shard(shard.path)]

    keys = [c.key for c in clips]
    assert len(keys) == len(set(keys)) == manifest.num_samples
    assert len(clips) + len(skips) == len(rows) == manifest.num_rows
    written_rows = {(c.meta["ytid"], c.meta["start_s"]) for c in clips}
    skipped_rows = {rows[s.source_row][:2] for s in skips}
    assert written_rows | skipped_rows == {r[:2] for r in rows.values()} and not written_rows & skipped_rows
    expected_reason = {"missing": "missing", "corrupt": "unreadable", "empty": "empty"}
    assert {rows[s.source_row][:2]: s.reason for s in skips} == {
        key: expected_reason[r["defect"]] for key, r in truth.items() if r["defect"]}

    csv_by_segment = {r[:2]: r[3] for r in rows.values()}
    audio_dir = synthetic_audioset / "audio" / "balanced_train"
    for clip in clips:
        segment = (clip.meta["ytid"], clip.meta["start_s"])
        assert clip.meta["mids"] == csv_by_segment[segment]
        assert clip.labels == [CLASSES.index_of_mid[m] for m in csv_by_segment[segment]]
        info = soundfile.info(audio_dir / clip.meta["source_file"])
        assert (clip.meta["source_rate"], clip.meta["source_channels"]) == (info.samplerate, info.channels)
        assert abs(len(clip.waveform) - info.frames * SAMPLE_RATE / info.samplerate) <= 1
        assert clip.meta["num_samples"] == len(clip.waveform)
    assert {c.meta["source_rate"] for c in clips} >= {16000, 44100}
    assert {c.meta["source_channels"] for c in clips} == {1, 2}
    assert sum(manifest.class_counts) == sum(len(c.labels) for c in clips)
    assert manifest.total_hours == pytest.approx(sum(len(c.waveform) for c in clips) / SAMPLE_RATE / 3600)


def test_rebuild_with_other_workers_gives_the_same_fingerprint_and_seed_changes_order(
        synthetic_audioset, synthetic_train_shards, tmp_path):
    inputs = read_segments([synthetic_audioset / "balanced_train_segments.csv"],
                           AudioIndex(synthetic_audioset / "audio" / "balanced_train"), CLASSES)
    reference = read_manifest(synthetic_train_shards)

    same = build(inputs, tmp_path / "same", workers=2)
    reseeded = build(inputs, tmp_path / "reseeded", seed=1)

    assert same.fingerprint == reference.fingerprint
    assert [s.sha256 for s in read_manifest(tmp_path / "same").shards] == [s.sha256 for s in reference.shards]
    other = read_manifest(tmp_path / "reseeded")
    assert reseeded.fingerprint != reference.fingerprint
    assert sorted(k for s in other.shards for k in s.keys) == sorted(k for s in reference.shards for k in s.keys)


def test_changed_audio_changes_the_fingerprint(tmp_path):
    audio = tmp_path / "audio"
    for ytid in ("aaaaaaaaaaa", "bbbbbbbbbbb"):
        write_tone(audio / f"{ytid}_0.000.wav")
    (tmp_path / "seg.csv").write_text(HEADER + 'aaaaaaaaaaa, 0.000, 1.000, "/m/09x0r"\n'
                                               'bbbbbbbbbbb, 0.000, 1.000, "/m/09x0r"\n')
    first = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "one")
    write_tone(audio / "bbbbbbbbbbb_0.000.wav", seconds=1.01)
    second = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "two")
    assert first.fingerprint != second.fingerprint


def test_rerun_is_a_no_op_other_settings_are_refused_and_overwrite_rebuilds(synthetic_audioset, tmp_path):
    inputs = read_segments([synthetic_audioset / "eval_segments.csv"],
                           AudioIndex(synthetic_audioset / "audio" / "eval"), CLASSES)
    first = build(inputs, tmp_path / "out")
    shard_times = [p.stat().st_mtime_ns for p in sorted((tmp_path / "out").glob("shard-*.tar"))]

    again = build(inputs, tmp_path / "out")
    assert again.up_to_date and again.fingerprint == first.fingerprint
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "out").glob("shard-*.tar"))] == shard_times

    with pytest.raises(ShardingError, match="--overwrite"):
        build(inputs, tmp_path / "out", samples_per_shard=3)
    rebuilt = build(inputs, tmp_path / "out", samples_per_shard=3, overwrite=True)
    assert rebuilt.num_shards == len(list((tmp_path / "out").glob("shard-*.tar"))) == -(-rebuilt.clips_decoded // 3)
    assert not (tmp_path / "out" / ".progress").exists()


def test_cli_prints_the_accounting_and_exit_codes(synthetic_audioset, tmp_path, capsys):
    args = ["--segments", str(synthetic_audioset / "eval_segments.csv"), "--audio-dir",
            str(synthetic_audioset / "audio" / "eval"), "--class-labels",
            str(synthetic_audioset / "class_labels_indices.csv"), "--out", str(tmp_path / "out"), "--workers", "1",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    skipped = sum(manifest.skipped_by_reason.values())
    assert f"rows 12: written {manifest.num_samples}, skipped {skipped} (" in printed
    assert "missing 1" in printed and "unreadable 1" in printed and "empty 1" in printed
    assert "clips/s" in printed and str(tmp_path / "out") in printed
    assert main(args + ["--seed", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_m4a_without_ffmpeg_is_skipped_with_that_reason(tmp_path, monkeypatch):
    audio = tmp_path / "audio"
    write_tone(audio / "aaaaaaaaaaa_0.000.wav")
    (audio / "bbbbbbbbbbb_0.000.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(64))
    (tmp_path / "seg.csv").write_text(HEADER + 'aaaaaaaaaaa, 0.000, 1.000, "/m/09x0r"\n'
                                               'bbbbbbbbbbb, 0.000, 1.000, "/m/09x0r"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries"))

    report = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "out")

    [skip] = read_skipped(tmp_path / "out")
    assert report.num_written == 1 and skip.reason == "unreadable" and "ffmpeg not found" in skip.detail


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg binary not installed")
def test_m4a_with_ffmpeg_is_written(tmp_path):
    audio = tmp_path / "audio"
    write_tone(tmp_path / "source.wav", seconds=2.0, rate=44100, channels=2)
    audio.mkdir()
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "source.wav"), "-c:a", "aac",
                    str(audio / "aaaaaaaaaaa_0.000.m4a")], check=True)
    (tmp_path / "seg.csv").write_text(HEADER + 'aaaaaaaaaaa, 0.000, 2.000, "/m/09x0r"\n')

    build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "out")

    [clip] = iter_shard(tmp_path / "out" / "shard-000000.tar")
    assert clip.meta["source_file"] == "aaaaaaaaaaa_0.000.m4a" and clip.meta["source_rate"] == 44100
    assert abs(len(clip.waveform) / SAMPLE_RATE - 2.0) < 0.1


def interrupted_run(tmp_path: Path) -> tuple[list[str], Path, Path, dict[str, int]]:
    """A data_prep.audioset run of 15 rows (14 clips, one missing file; shards of 2) SIGKILLed once its first shard
    is in place → (its command, audio dir, out dir, {surviving shard: mtime_ns})."""
    audio, rows = tmp_path / "audio", []
    rng = np.random.default_rng(0)
    for i in range(14):
        ytid = f"clip{i:04d}xyz"
        frames = rng.uniform(-0.3, 0.3, size=(48000 * 10, 2)).astype(np.float32)
        audio.mkdir(exist_ok=True)
        soundfile.write(audio / f"{ytid}_0.000.wav", frames, 48000, subtype="FLOAT")
        rows.append(f'{ytid}, 0.000, 10.000, "/m/09x0r"')
    rows.append('missingxxxx, 0.000, 10.000, "/m/09x0r"')
    (tmp_path / "seg.csv").write_text(HEADER + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep.audioset", "--segments", str(tmp_path / "seg.csv"), "--audio-dir",
               str(audio), "--out", str(out), "--samples-per-shard", "2", "--workers", "1", "--no-progress"]

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("shard-*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    survivors = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert survivors and all(len(list(iter_shard(out / name))) == 2 for name in survivors)  # complete shards only
    return command, audio, out, survivors


def test_killed_run_resumes_without_duplicates_and_matches_an_uninterrupted_run(tmp_path):
    command, audio, out, survivors = interrupted_run(tmp_path)
    resumed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)

    manifest = read_manifest(out)
    keys = [clip.key for shard in manifest.shards for clip in iter_shard(shard.path)]
    assert len(keys) == len(set(keys)) == 14 and manifest.num_rows == 15
    assert [s.reason for s in read_skipped(out)] == ["missing"]
    assert "shards kept from an earlier run" in resumed.stdout and "rows 15: written 14, skipped 1" in resumed.stdout
    for name, mtime_ns in survivors.items():
        assert (out / name).stat().st_mtime_ns == mtime_ns  # finished shards were not redone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    uninterrupted = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "clean",
                          samples_per_shard=2)
    assert uninterrupted.fingerprint == manifest.fingerprint


def test_a_kept_shard_is_checked_by_its_checksum_not_its_size(tmp_path):
    command, audio, out, survivors = interrupted_run(tmp_path)
    corrupt = out / sorted(survivors)[0]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size, other bytes
    corrupt.write_bytes(bytes(data))
    subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    manifest = read_manifest(out)
    assert corrupt.stat().st_mtime_ns != survivors[corrupt.name]  # redone, not kept
    uninterrupted = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "clean",
                          samples_per_shard=2)
    assert uninterrupted.fingerprint == manifest.fingerprint
    assert all(len(list(iter_shard(shard.path))) == 2 for shard in manifest.shards)


def test_csv_with_byte_order_mark_and_crlf_lines_reads_like_plain_csv(tmp_path):
    write_tone(tmp_path / "audio" / "aaaaaaaaaaa_30.000.wav")
    body = HEADER + 'aaaaaaaaaaa, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
    (tmp_path / "plain.csv").write_text(body)
    (tmp_path / "windows.csv").write_bytes(b"\xef\xbb\xbf" + body.replace("\n", "\r\n").encode())
    index = AudioIndex(tmp_path / "audio")

    [plain] = read_segments([tmp_path / "plain.csv"], index, CLASSES)
    [windows] = read_segments([tmp_path / "windows.csv"], index, CLASSES)

    assert isinstance(windows, SourceRow) and (windows.key, windows.labels) == (plain.key, plain.labels)


def test_non_finite_times_and_empty_labels_are_malformed_rows_not_crashes(tmp_path):
    audio = tmp_path / "audio"
    for ytid in ("aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc", "ddddddddddd", "eeeeeeeeeee"):
        write_tone(audio / f"{ytid}.wav")
    (tmp_path / "seg.csv").write_text(HEADER + "\n".join([
        'aaaaaaaaaaa, nan, 10.000, "/m/09x0r"',     # 4
        'bbbbbbbbbbb, 0.000, inf, "/m/09x0r"',      # 5
        'ccccccccccc, 0.000, nan, "/m/09x0r"',      # 6
        'ddddddddddd, 0.000, 10.000, ""',           # 7: no label at all
        'eeeeeeeeeee, 0.000, 10.000, "/m/09x0r"',   # 8: good
    ]) + "\n")
    entries = read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES)
    assert [type(e).__name__ for e in entries] == ["Skip"] * 4 + ["SourceRow"]
    assert all(e.reason == MALFORMED for e in entries[:4])
    assert all("finite" in e.detail for e in entries[:3]) and "no labels" in entries[3].detail


def test_a_label_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "class_labels_indices.csv"
    path.write_bytes(b"\xef\xbb\xbf" + b'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/0hdsk,"Music"\n')
    assert load_class_labels(path).names == ("Speech", "Music")


def test_a_clip_below_a_symlinked_subdirectory_is_found(tmp_path):
    write_tone(tmp_path / "disk2" / "aaaaaaaaaaa_30.000.wav")
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "part2").symlink_to(tmp_path / "disk2", target_is_directory=True)
    (tmp_path / "seg.csv").write_text(HEADER + 'aaaaaaaaaaa, 30.000, 40.000, "/m/09x0r"\n')
    (entry,) = read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES)
    assert isinstance(entry, SourceRow) and entry.source_file == "part2/aaaaaaaaaaa_30.000.wav"


def test_a_whole_video_file_is_cut_to_the_segment_and_a_segment_file_is_taken_whole(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    video = (rng.standard_normal(60 * SAMPLE_RATE) * 0.1).astype(np.float32)
    soundfile.write(audio / "vvvvvvvvvvv.wav", video, SAMPLE_RATE, subtype="FLOAT")  # a 60 s video
    soundfile.write(audio / "wwwwwwwwwww.wav", video[: 10 * SAMPLE_RATE], SAMPLE_RATE, subtype="FLOAT")  # a segment
    soundfile.write(audio / "xxxxxxxxxxx.wav", video[: 25 * SAMPLE_RATE], SAMPLE_RATE, subtype="FLOAT")  # neither
    (tmp_path / "seg.csv").write_text(HEADER + 'vvvvvvvvvvv, 30.000, 40.000, "/m/09x0r"\n'
                                               'wwwwwwwwwww, 170.000, 180.000, "/m/09x0r"\n'
                                               'xxxxxxxxxxx, 170.000, 180.000, "/m/09x0r"\n')

    report = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "out")

    clips = {clip.key: clip for clip in iter_shard(tmp_path / "out" / "shard-000000.tar", dtype="int16")}
    expected = encode_audio(video[30 * SAMPLE_RATE : 40 * SAMPLE_RATE], "pcm16")[0]
    assert clips["vvvvvvvvvvv_30000"].waveform.tobytes() == expected  # [30, 40) of the video, not its start
    assert clips["vvvvvvvvvvv_30000"].meta["span_s"] == [30.0, 40.0]
    assert clips["wwwwwwwwwww_170000"].waveform.tobytes() == encode_audio(video[: 10 * SAMPLE_RATE], "pcm16")[0]
    [skip] = read_skipped(tmp_path / "out")
    assert report.num_written == 2 and skip.reason == "unreadable" and "lasts 25.00 s" in skip.detail


def test_two_segments_mapping_to_one_bare_video_file_are_each_refused_with_the_reason(tmp_path):
    audio = tmp_path / "audio"
    write_tone(audio / "vvvvvvvvvvv.wav", seconds=60.0)
    write_tone(audio / "wwwwwwwwwww_0.000.wav")
    (tmp_path / "seg.csv").write_text(HEADER + 'vvvvvvvvvvv, 0.000, 10.000, "/m/09x0r"\n'
                                               'vvvvvvvvvvv, 30.000, 40.000, "/m/09x0r"\n'
                                               'wwwwwwwwwww, 0.000, 1.000, "/m/09x0r"\n')

    report = build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "out")

    skips = read_skipped(tmp_path / "out")
    assert report.num_written == 1 and [s.reason for s in skips] == ["ambiguous file", "ambiguous file"]
    assert all("vvvvvvvvvvv.wav" in s.detail and "seg.csv:4, seg.csv:5" in s.detail for s in skips)


def test_a_bare_video_file_as_long_as_its_segment_is_the_segment_even_when_the_segment_starts_near_zero(tmp_path):
    """`YTID.wav` of 10 s for the segment [0.634, 10.634): the file is the segment (as the demo's synthetic data has
    it), not a 10 s video to cut from 0.634 s (which dropped its first 0.634 s)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    segment = (np.random.default_rng(1).standard_normal(10 * SAMPLE_RATE) * 0.1).astype(np.float32)
    soundfile.write(audio / "yyyyyyyyyyy.wav", segment, SAMPLE_RATE, subtype="FLOAT")
    (tmp_path / "seg.csv").write_text(HEADER + 'yyyyyyyyyyy, 0.634, 10.634, "/m/09x0r"\n')

    build(read_segments([tmp_path / "seg.csv"], AudioIndex(audio), CLASSES), tmp_path / "out")

    (clip,) = iter_shard(tmp_path / "out" / "shard-000000.tar", dtype="int16")
    assert clip.key == "yyyyyyyyyyy_634" and clip.waveform.tobytes() == encode_audio(segment, "pcm16")[0]
