import subprocess
import sys

import numpy as np
import pytest
import soundfile

from ced_train.audio import SAMPLE_RATE
from ced_train.data import iter_shard, read_manifest, read_skipped
from ced_train.labels import load_class_labels
from data_prep.folder import folder_inputs, keys_for_paths, main

CLASSES = load_class_labels()


def write_audio(path, seconds=0.5, rate=SAMPLE_RATE, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = 0.2 * np.sin(2 * np.pi * 300 * np.arange(int(seconds * rate)) / rate)
    soundfile.write(path, np.stack([frames] * channels, axis=1), rate)


def test_keys_are_dot_free_unique_and_stable():
    paths = ["dogs/bark.01.wav", "dogs/bark_01.wav", "cats/meow.flac", "x y/ü.ogg"]

    keys = keys_for_paths(paths)

    assert keys["cats/meow.flac"] == "cats__meow"
    assert keys["x y/ü.ogg"] == "x_y___"
    assert keys["dogs/bark.01.wav"] != keys["dogs/bark_01.wav"]  # both would be dogs__bark_01: hashed apart
    assert all(key.startswith("dogs__bark_01-") for key in (keys["dogs/bark.01.wav"], keys["dogs/bark_01.wav"]))
    assert all("." not in key for key in keys.values())
    assert keys == keys_for_paths(list(reversed(paths)))


def test_unlabelled_folder_writes_every_audio_file_without_labels(tmp_path, capsys):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", seconds=1.5, rate=44100, channels=2)
    write_audio(audio / "nested" / "b.flac")
    (audio / "notes.txt").write_text("ignored: not audio")
    (audio / "c.wav").write_text("corrupt")

    code = main(["--audio-dir", str(audio), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])

    assert code == 0 and "rows 3: written 2, skipped 1 (unreadable 1)" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    clips = {c.key: c for s in manifest.shards for c in iter_shard(s.path)}
    assert set(clips) == {"a", "nested__b"} and not manifest.labelled
    assert clips["a"].labels == [] and clips["a"].meta["source_file"] == "a.wav"
    assert abs(len(clips["a"].waveform) - 1.5 * SAMPLE_RATE) <= 1 and clips["a"].meta["source_channels"] == 2
    assert [(s.source_row, s.reason) for s in read_skipped(tmp_path / "out")] == [("c.wav", "unreadable")]


def test_label_tsv_lists_the_rows_and_unlisted_files_are_left_out(tmp_path):
    audio = tmp_path / "audio"
    for name in ("one.wav", "two.wav", "three.wav", "extra.wav"):
        write_audio(audio / name)
    (tmp_path / "labels.tsv").write_text(
        "# path\tmids\n"
        "one.wav\t/m/09x0r,/m/0hdsk\n"
        "two.wav\t\n"
        "three.wav\t/m/bogus\n"
        "gone.wav\t/m/09x0r\n"
        "one.wav\t/m/09x0r\n"
        "no tab here\n"
    )

    inputs, unlisted = folder_inputs(audio, CLASSES, tmp_path / "labels.tsv")

    assert unlisted == 1  # extra.wav
    assert [getattr(e, "reason", "clip") for e in inputs] == [
        "clip", "clip", "unknown label", "missing", "duplicate", "malformed row"]
    assert inputs[0].labels == (0, CLASSES.index_of_mid["/m/0hdsk"]) and inputs[1].labels == ()
    assert main(["--audio-dir", str(audio), "--labels", str(tmp_path / "labels.tsv"), "--out",
                 str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest.labelled and manifest.num_rows == 6 and manifest.num_samples == 2
    assert manifest.skipped_by_reason == {"unknown label": 1, "missing": 1, "duplicate": 1, "malformed row": 1}


def test_symlinked_subdirectories_are_followed_once_even_through_a_loop(tmp_path, capsys):
    store = tmp_path / "elsewhere" / "recordings"
    write_audio(store / "field.wav")
    audio = tmp_path / "audio"
    write_audio(audio / "local.wav")
    (audio / "linked").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(store.parent, target_is_directory=True)  # elsewhere/recordings/loop -> elsewhere

    code = main(["--audio-dir", str(audio), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])

    assert code == 0 and "rows 2: written 2" in capsys.readouterr().out
    keys = [clip.key for shard in read_manifest(tmp_path / "out").shards for clip in iter_shard(shard.path)]
    assert sorted(keys) == ["linked__field", "local"]


@pytest.mark.parametrize("content", [b'index,mid,display_name\n0,/m/a\n', b"\xff\xfe not text", b"mid,name\n"])
def test_a_bad_class_label_file_is_one_line_naming_it(tmp_path, content):
    write_audio(tmp_path / "audio" / "a.wav")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "data_prep.folder", "--audio-dir", str(tmp_path / "audio"), "--out",
                             str(tmp_path / "out"), "--class-labels", str(labels)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"python -m data_prep.folder: error: --class-labels: {labels}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--audio-dir", "{tmp}/nowhere"], "--audio-dir: no such directory {tmp}/nowhere"),
    (["--audio-dir", "{tmp}", "--labels", "{tmp}/none.tsv"], "--labels: no such file {tmp}/none.tsv"),
])
def test_missing_paths_are_one_line_naming_the_option(tmp_path, argv, message):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = subprocess.run([sys.executable, "-m", "data_prep.folder", *argv, "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(message.replace("{tmp}", str(tmp_path)))


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, small_disk):
    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    for i in range(8):  # 10 s of noise each, about 300 kB as FLAC: four shards of two overflow 2 MiB
        soundfile.write(tmp_path / "audio" / f"n{i}.wav", rng.uniform(-0.5, 0.5, 160000).astype(np.float32),
                        SAMPLE_RATE)
    out = small_disk / "out"
    result = subprocess.run([sys.executable, "-m", "data_prep.folder", "--audio-dir", str(tmp_path / "audio"), "--out",
                             str(out), "--samples-per-shard", "2", "--workers", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"data_prep.folder: error: writing {out}: No space left on device")
    assert not [path for path in out.rglob("*") if ".partial" in path.name]
    assert not (out / "manifest.json").exists() and list(out.glob("shard-*.tar"))  # finished shards kept
