"""Streaming tagging (`python -m ced_train.tag --stream`): sources, the ring buffer of windows, the JSON lines and the
events they carry, and what a broken source does. The events are checked against the truth of a synthetic clip with
a tagger that hears its classes (tests/fixtures/demo_teacher.ckpt, one of the demo's teachers)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_train import export, tag
from ced_train.audio import load_audio
from ced_train.models import create_model
from ced_train.sed_metrics import event_based
from ced_train.streaming import PcmFormat, PipeSource, SlidingWindows, SourceError
from ced_train.windowed import WindowTagger, score_window
from data_prep.synthetic import GENERATORS

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "tests" / "fixtures" / "demo_teacher.ckpt"
SR = 16000
# The synthetic clip: (class, onset_s, offset_s) over a faint noise floor, 14 s in all.
TRUTH = [("Buzz", 2.0, 6.0), ("Chirp tone", 8.0, 11.0)]
CLIP_S = 14.0
# How far a boundary found with 2 s windows every 0.5 s may lie from the truth: an event's span runs between the
# centres of its first and last windows (ced_train.events), which is exact for a tagger that turns positive when the
# sound covers half the window; one that turns positive as soon as the sound enters the window (or only once it fills
# it) moves the boundary by up to half a window, and the hop quantises it by half a hop.
TOLERANCE_S = 2.0 / 2 + 0.5 / 2


def events_clip() -> np.ndarray:
    """`TRUTH` rendered by the synthetic generator's own classes, as int16 samples at 16 kHz."""
    rng = np.random.default_rng(7)
    wave = 0.002 * rng.standard_normal(round(CLIP_S * SR))
    for name, onset, offset in TRUTH:
        start, length = round(onset * SR), round((offset - onset) * SR)
        event = GENERATORS[name](rng, length, SR)
        fade = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / (0.01 * SR))
        wave[start : start + length] += 0.5 * event * fade / np.abs(event).max()
    return np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, bytes]:
    """The clip as a 16-bit WAV file and as raw s16le bytes (the same samples)."""
    samples = events_clip()
    path = tmp_path_factory.mktemp("stream") / "events.wav"
    sf.write(path, samples, SR, subtype="PCM_16")
    return path, samples.tobytes()


def run_tag(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ced_train.tag", *args], input=stdin, capture_output=True,
                          timeout=timeout, cwd=ROOT)


def records_of(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def events_of(records: list[dict]) -> list[tuple[str, float, float]]:
    return [(e["label"], e["onset_s"], e["offset_s"]) for r in records for e in r["closed"]]


# --- the ring buffer ---------------------------------------------------------------------------------------------

def test_sliding_windows_equal_slices_of_the_whole_stream_whatever_the_block_sizes():
    rng = np.random.default_rng(0)
    stream = rng.standard_normal(SR * 7 + 123).astype(np.float32)
    windows = SlidingWindows(2 * SR, SR // 2)
    cuts = np.sort(rng.choice(len(stream), size=40, replace=False))
    got = [w for block in np.split(stream, cuts) for w in windows.push(block)]
    got.append(windows.finish())
    ends = [min((i + 1) * SR // 2, len(stream)) for i in range(len(got))]
    assert [round(w.end_s * SR) for w in got] == ends and ends[-1] == len(stream)
    for window, end in zip(got, ends):
        start = max(0, end - 2 * SR)
        assert window.start_s == start / SR
        np.testing.assert_array_equal(window.samples, stream[start:end])
    assert windows._ring.nbytes == 2 * SR * 4  # one window, however long the stream
    assert windows.finish() is None


# --- sources -----------------------------------------------------------------------------------------------------

def pipe_with(data: bytes) -> io.BufferedReader:
    """A real pipe holding `data`, closed for writing (a source that ends)."""
    read_fd, write_fd = os.pipe()
    threading.Thread(target=lambda: (os.write(write_fd, data), os.close(write_fd)), daemon=True).start()
    return os.fdopen(read_fd, "rb")


def test_a_stereo_48k_wav_stream_decodes_as_data_prep_decodes_the_file(tmp_path):
    rng = np.random.default_rng(1)
    stereo = (0.3 * rng.standard_normal((48000 * 3 + 17, 2))).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 48000, subtype="FLOAT")
    source = PipeSource(pipe_with(path.read_bytes()), "stdin", PcmFormat(SR, 1, "s16le"))
    assert source.fmt == PcmFormat(48000, 2, "f32le")
    streamed = np.concatenate(list(source.blocks(1000)))
    np.testing.assert_allclose(streamed, load_audio(path).waveform, rtol=0, atol=1e-6)
    assert source.trailing_bytes == 0


@pytest.mark.parametrize("rate, channels, bits, tag_, reason", [
    (0, 1, 16, 1, "announces 0 Hz"),
    (16000, 0, 16, 1, "announces 0 channels"),
    (16000, 1, 8, 1, "8-bit samples is not read"),
])
def test_a_wav_header_announcing_what_no_source_has_is_refused_in_one_line(rate, channels, bits, tag_, reason):
    block_align = max(1, channels * bits // 8)
    header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
              + struct.pack("<HHIIHH", tag_, channels, rate, rate * block_align, block_align, bits)
              + b"data" + struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(SourceError, match=reason) as raised:
        PipeSource(pipe_with(header + bytes(3200)), "stdin", PcmFormat(SR, 1, "s16le"))
    assert raised.value.exit_code == 2 and "\n" not in str(raised.value)


# --- the CLI: JSON lines and events against the truth --------------------------------------------------------------

@pytest.fixture(scope="module")
def streamed(clip):
    """`tag --stream` of the clip from stdin (raw s16le) and from the file."""
    path, raw = clip
    common = ["--checkpoint", str(DEMO_TEACHER), "--top-k", "3"]
    from_stdin = run_tag("--stream", "-", *common, stdin=raw)
    from_file = run_tag("--stream", str(path), *common)
    return from_stdin, from_file


def test_stdin_and_file_streams_print_one_line_per_hop_with_the_models_scores_of_each_window(streamed, clip):
    from_stdin, from_file = streamed
    assert from_stdin.returncode == 0 and from_file.returncode == 0, from_stdin.stderr + from_file.stderr
    stdin_records, file_records = records_of(from_stdin.stdout), records_of(from_file.stdout)
    strip = lambda records: [{k: v for k, v in r.items() if k != "compute_ms"} for r in records]  # noqa: E731
    assert strip(stdin_records) == strip(file_records)  # the same samples, the same lines
    hops = stdin_records[:-1]
    assert [r["end_s"] for r in hops] == [0.5 * (i + 1) for i in range(int(CLIP_S / 0.5))]
    assert [r["start_s"] for r in hops] == [max(0.0, 0.5 * (i + 1) - 2.0) for i in range(len(hops))]
    model, names = tag.load_tagger(str(DEMO_TEACHER), None, False)
    samples = events_clip().astype(np.float32) / 32768
    for record in hops[::5]:
        probs = score_window(model, samples[round(record["start_s"] * SR) : round(record["end_s"] * SR)])
        assert [t["index"] for t in record["top"]] == np.argsort(-probs, kind="stable")[:3].tolist()
        np.testing.assert_allclose([t["probability"] for t in record["top"]], np.sort(probs)[::-1][:3], atol=1e-6)
    assert stdin_records[-1]["start_s"] is None and stdin_records[-1]["end_s"] == CLIP_S
    assert f"stream: stdin: {CLIP_S:.2f} s" in from_stdin.stderr.decode()


def test_the_streamed_events_are_the_clips_true_events_within_the_tolerance(streamed):
    records = records_of(streamed[0].stdout)
    events = events_of(records)
    opened = [(e["label"], e["onset_s"]) for r in records for e in r["opened"]]
    assert sorted(opened) == sorted((label, onset) for label, onset, _ in events)  # each opened one is closed
    for label, onset, offset in TRUTH:
        (match,) = [e for e in events if e[0] == label]
        assert abs(match[1] - onset) <= TOLERANCE_S and abs(match[2] - offset) <= TOLERANCE_S, (label, match)
    reference = {"clip": [(onset, offset, label) for label, onset, offset in TRUTH]}
    predicted = {"clip": [(onset, offset, label) for label, onset, offset in events]}
    # Over the clip's classes (this teacher also calls the bare noise floor "Whistle": its error, not the stream's).
    scores = event_based(reference, predicted, [label for label, _, _ in TRUTH], t_collar=TOLERANCE_S,
                         percentage_of_length=0.0)
    assert scores.overall.f1 == 1.0, (events, scores)
    # An event is reported open before the stream is past it: no later than its onset + window + filter delay.
    for record in records:
        for event in record["opened"]:
            assert record["end_s"] <= event["onset_s"] + 2.0 + 0.5 * 1 + 1.0


def test_events_of_files_are_the_streams_events_and_are_scored_against_a_truth_file(streamed, clip, tmp_path):
    path, _ = clip
    truth = tmp_path / "truth.tsv"
    truth.write_text("filename\tonset\toffset\tevent_label\n"
                     + "".join(f"{path.name}\t{onset}\t{offset}\t{label}\n" for label, onset, offset in TRUTH))
    out = tmp_path / "events.tsv"
    result = run_tag(str(path), "--checkpoint", str(DEMO_TEACHER), "--events", str(out), "--truth", str(truth))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["filename", "onset", "offset", "event_label", "score"]
    written = sorted((row.split("\t")[3], float(row.split("\t")[1]), float(row.split("\t")[2])) for row in lines[1:])
    assert written == sorted(events_of(records_of(streamed[1].stdout)))
    stderr = result.stderr.decode()
    assert f"to {out}" in stderr and "event-based (collar 0.2 s, 20 %): F1" in stderr and "segment-based" in stderr


# --- ONNX -----------------------------------------------------------------------------------------------------------

def test_exported_onnx_models_stream_like_the_torch_model(tmp_path, clip):
    torch.manual_seed(0)
    checkpoint = tmp_path / "ced_test.pt"
    torch.save({"model": create_model("ced_test").state_dict()}, checkpoint)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(fp32)]) == 0
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(int8), "--quantize", "int8"]) == 0
    path, _ = clip
    samples = load_audio(path).waveform
    records = {}
    for name, model_path in (("torch", checkpoint), ("fp32", fp32), ("int8", int8)):
        model, names = tag.load_tagger(str(model_path), None, False)
        tagger = WindowTagger(model, names, top_k=527, keep_scores=True)
        tagger.push(samples)
        tagger.finish()
        records[name] = np.stack([probs for _, _, probs in tagger.scores])
    assert records["torch"].shape == (int(CLIP_S / 0.5), 527)
    np.testing.assert_allclose(records["fp32"], records["torch"], rtol=0, atol=1e-5)
    assert 0 < np.abs(records["int8"] - records["torch"]).max() <= 0.05


def test_a_file_that_is_not_an_onnx_model_is_one_line(tmp_path, clip):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = run_tag("--stream", str(clip[0]), "--checkpoint", str(bad))
    assert result.returncode == 2 and result.stdout == b""
    (line,) = result.stderr.decode().strip().splitlines()
    assert str(bad) in line and "not a loadable ONNX model" in line


# --- a source that goes wrong -------------------------------------------------------------------------------------

def assert_closed_and_one_line(result: subprocess.CompletedProcess, code: int, phrase: str) -> list[dict]:
    assert result.returncode == code, result.stderr
    (line,) = result.stderr.decode().strip().splitlines()
    assert phrase in line and "Traceback" not in line
    records = records_of(result.stdout)
    assert records[-1]["start_s"] is None  # the closing line
    opened = {(e["label"], e["onset_s"]) for r in records for e in r["opened"]}
    assert opened == {(label, onset) for label, onset, _ in events_of(records)}  # every event closed
    return records


def test_stdin_that_ends_mid_sample_is_tagged_to_there_then_exit_1(clip):
    raw = clip[1][: 6 * SR * 2 + 1]  # 6 s and one byte of the next sample
    result = run_tag("--stream", "-", "--checkpoint", str(DEMO_TEACHER), stdin=raw)
    records = assert_closed_and_one_line(result, 1, "ended mid-sample (1 trailing bytes of a 2-byte frame dropped)")
    assert records[-1]["end_s"] == 6.0 and ("Buzz", 6.0) in [(e["label"], e["offset_s"]) for e in records[-1]["closed"]]


def test_digital_silence_is_exit_3_with_no_events():
    result = run_tag("--stream", "-", "--checkpoint", str(DEMO_TEACHER), stdin=bytes(4 * SR * 2))
    records = assert_closed_and_one_line(result, 3, "held only digital silence (4.00 s); no events")
    assert len(records) == 9 and events_of(records) == []


def test_a_stalled_pipe_is_exit_1_with_its_events_closed(clip):
    process = subprocess.Popen([sys.executable, "-m", "ced_train.tag", "--stream", "-", "--checkpoint",
                                str(DEMO_TEACHER), "--stall-timeout-s", "2"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    process.stdin.write(clip[1][: 5 * SR * 2])  # 5 s, then the writer keeps the pipe open and says nothing
    process.stdin.flush()
    stdout, stderr = process.stdout.read(), process.stderr.read()  # both end when the process gives up waiting
    process.wait(timeout=60)
    process.stdin.close()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    records = assert_closed_and_one_line(result, 1, "stdin: no data for 2 s (a stalled pipe)")
    assert records[-1]["end_s"] == 5.0


def test_ctrl_c_closes_the_open_events_and_exits_130(clip):
    process = subprocess.Popen([sys.executable, "-m", "ced_train.tag", "--stream", str(clip[0]), "--realtime",
                                "--checkpoint", str(DEMO_TEACHER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=ROOT)
    lines = []
    for line in process.stdout:  # until the Buzz event is open (about 4 s into the clip, paced at real time)
        lines.append(line)
        if any(e["label"] == "Buzz" for e in json.loads(line)["opened"]):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, b"".join(lines) + stdout, stderr)
    records = assert_closed_and_one_line(result, 130, "interrupted after")
    assert records[-1]["end_s"] < 8.0  # it stopped there, not at the clip's end
    (buzz,) = [e for e in records[-1]["closed"] if e["label"] == "Buzz"]
    assert buzz["offset_s"] == records[-1]["end_s"]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary (.ci/run installs it)")
def test_ffmpeg_input_streams_like_the_file_and_a_bad_device_is_one_line(clip, streamed):
    path, _ = clip
    result = run_tag("--ffmpeg-input", f"-i {path}", "--checkpoint", str(DEMO_TEACHER), "--top-k", "3")
    assert result.returncode == 0, result.stderr
    strip = lambda records: [{k: v for k, v in r.items() if k != "compute_ms"} for r in records]  # noqa: E731
    assert strip(records_of(result.stdout)) == strip(records_of(streamed[1].stdout))
    bad = run_tag("--ffmpeg-input", "-f alsa -i no_such_device", "--checkpoint", str(DEMO_TEACHER))
    assert bad.returncode == 2 and bad.stdout == b""
    (line,) = bad.stderr.decode().strip().splitlines()
    assert line.startswith("error: ffmpeg -f alsa -i no_such_device: ffmpeg failed")


def test_thresholds_tuned_on_labelled_files_are_written_and_used(clip, tmp_path):
    path, _ = clip
    truth = tmp_path / "truth.tsv"
    truth.write_text("filename\tonset\toffset\tevent_label\n"
                     + "".join(f"{path.name}\t{onset}\t{offset}\t{label}\n" for label, onset, offset in TRUTH))
    common = [str(path), "--checkpoint", str(DEMO_TEACHER), "--truth", str(truth), "--events"]
    tuned_file = tmp_path / "thresholds.tsv"
    tuned = run_tag(*common, str(tmp_path / "tuned.tsv"), "--tune-thresholds", str(tuned_file))
    assert tuned.returncode == 0, tuned.stderr
    rows = [line.split("\t") for line in tuned_file.read_text().splitlines()]
    assert rows[0] == ["label", "on", "off"] and len(rows) == 1 + 527
    on = {label: float(value) for label, value, _ in rows[1:]}
    assert on["Whistle"] == 0.5 and 0.05 <= on["Buzz"] <= 0.95  # classes without truth keep the default
    # The file reads back as --thresholds and gives the same events.
    again = run_tag(*common, str(tmp_path / "again.tsv"), "--thresholds", str(tuned_file))
    assert (tmp_path / "again.tsv").read_text() == (tmp_path / "tuned.tsv").read_text()
    assert f"wrote per-class thresholds tuned on 1 files to {tuned_file}" in tuned.stderr.decode()
    assert again.stderr.decode().splitlines()[-2:] == tuned.stderr.decode().splitlines()[-2:]  # the same F1 lines
