import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds

from ced_train.audio import SAMPLE_RATE
from ced_train.data import (
    Manifest,
    ShardFormatError,
    ShardReader,
    ShardWriter,
    Skip,
    check_key,
    compute_fingerprint,
    decode_audio,
    encode_audio,
    iter_shard,
    read_manifest,
    read_shard,
    read_skipped,
    write_manifest,
    write_skipped,
)


def waveform(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * SAMPLE_RATE))).astype(np.float32)


def write_test_shard(path, clips):
    with ShardWriter(path) as writer:
        for key, wave, labels in clips:
            flac, _ = encode_audio(wave)
            writer.add(key, flac, {"key": key, "labels": labels, "duration_s": len(wave) / SAMPLE_RATE})


CLIPS = [("b-clip_1", waveform(1.0, 1), [3]), ("a_clip_2", waveform(0.25, 2), []), ("c_3", waveform(2.0, 3), [0, 5])]


def test_shard_round_trip_keeps_order_labels_and_16bit_audio(tmp_path):
    write_test_shard(tmp_path / "shard-000000.tar", CLIPS)

    clips = list(iter_shard(tmp_path / "shard-000000.tar"))

    assert [c.key for c in clips] == [key for key, _, _ in CLIPS]  # stored order, not sorted
    for clip, (key, wave, labels) in zip(clips, CLIPS):
        assert clip.labels == labels and clip.shard == "shard-000000.tar" and clip.meta["key"] == key
        assert clip.waveform.dtype == np.float32 and clip.waveform.shape == wave.shape
        np.testing.assert_allclose(clip.waveform, wave, atol=1 / 32767)


def test_read_shard_and_shard_reader_give_the_same_clips_by_key(tmp_path):
    write_test_shard(tmp_path / "s.tar", CLIPS)

    everything = read_shard(tmp_path / "s.tar")
    lazy = ShardReader(tmp_path / "s.tar")

    assert list(everything) == list(lazy) == [key for key, _, _ in CLIPS]
    np.testing.assert_array_equal(lazy["c_3"].waveform, everything["c_3"].waveform)
    assert lazy["c_3"].labels == [0, 5] and len(lazy) == 3
    with pytest.raises(KeyError):
        lazy["absent"]


def test_clip_fields_read_by_attribute_or_by_name(tmp_path):
    write_test_shard(tmp_path / "s.tar", CLIPS[:1])
    clip = next(iter_shard(tmp_path / "s.tar"))
    assert clip["key"] == clip.key and clip["labels"] == clip.labels
    with pytest.raises(KeyError):
        clip["nope"]


def test_webdataset_groups_our_members_into_the_same_samples(tmp_path):
    write_test_shard(tmp_path / "s.tar", CLIPS)

    samples = list(wds.tarfile_samples([{"url": str(tmp_path / "s.tar")}]))

    assert [s["__key__"] for s in samples] == [key for key, _, _ in CLIPS]
    assert all(set(s) >= {"flac", "json"} for s in samples)


def test_dotted_audioset_name_would_break_webdataset_keys_so_writer_refuses_it(tmp_path):
    with tarfile.open(tmp_path / "naive.tar", "w") as tar:
        for name in ("YTID_30.000.flac", "YTID_30.000.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    [sample] = wds.tarfile_samples([{"url": str(tmp_path / "naive.tar")}])
    assert sample["__key__"] == "YTID_30" and "000.flac" in sample  # the problem the key rule avoids

    with pytest.raises(ValueError, match="letters, digits"):
        check_key("YTID_30.000")
    with ShardWriter(tmp_path / "s.tar") as writer, pytest.raises(ValueError):
        writer.add("YTID_30.000", b"", {"key": "YTID_30.000"})


def test_writer_rejects_duplicate_keys_and_leaves_nothing_visible_on_error(tmp_path):
    flac, _ = encode_audio(waveform(0.1, 0))
    with pytest.raises(ValueError, match="duplicate"):
        with ShardWriter(tmp_path / "s.tar") as writer:
            writer.add("k", flac, {"key": "k"})
            writer.add("k", flac, {"key": "k"})
    assert list(tmp_path.iterdir()) == []


def test_shard_is_invisible_until_closed(tmp_path):
    writer = ShardWriter(tmp_path / "s.tar")
    writer.add("k", encode_audio(waveform(0.1, 0))[0], {"key": "k"})
    assert not (tmp_path / "s.tar").exists()
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"]


def test_finish_reports_size_and_hash_before_publish_makes_the_shard_visible(tmp_path):
    writer = ShardWriter(tmp_path / "s.tar")
    writer.add("k", encode_audio(waveform(0.1, 0))[0], {"key": "k"})
    size, sha256 = writer.finish()
    assert not (tmp_path / "s.tar").exists()
    writer.publish()
    data = (tmp_path / "s.tar").read_bytes()
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_equal_content_gives_byte_identical_shards(tmp_path):
    write_test_shard(tmp_path / "one.tar", CLIPS)
    write_test_shard(tmp_path / "two.tar", CLIPS)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_encode_flac_clips_out_of_range_samples_and_hashes_what_is_stored():
    loud = np.array([2.0, -2.0, 0.5], dtype=np.float32)
    flac, digest = encode_audio(loud)
    np.testing.assert_allclose(decode_audio(flac, "flac"), [32767 / 32768, -1.0, 0.5], atol=1e-4)
    assert digest == encode_audio(np.array([1.0, -1.5, 0.5], dtype=np.float32))[1]  # same int16 after clipping
    assert digest != encode_audio(np.array([1.0, -1.0, 0.25], dtype=np.float32))[1]


def test_decode_rejects_audio_that_is_not_16k_mono():
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((100, 2)), 44100, format="FLAC")
    with pytest.raises(ShardFormatError, match="16000 Hz mono"):
        decode_audio(buffer.getvalue(), "flac", "s.tar: sample 'k'")


def test_sample_without_its_json_is_a_format_error_naming_shard_and_key(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        data = encode_audio(waveform(0.1, 0))[0]
        info = tarfile.TarInfo("lonely.flac")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardFormatError, match=r"bad.tar: sample 'lonely'.*json"):
        list(iter_shard(tmp_path / "bad.tar"))


def manifest_payload(tmp_path, shard_bytes: int) -> dict:
    return {
        "tool": "test", "tool_version": "0", "seed": 0, "labelled": True, "num_classes": 2,
        "class_labels": {"mids": ["/m/a", "/m/b"], "names": ["A", "B"]}, "num_rows": 3, "num_written": 2,
        "skipped_by_reason": {"missing": 1}, "total_hours": 0.001, "class_counts": [1, 1], "plan_id": "p",
        "fingerprint": "f", "shards": [{"name": "s.tar", "num_samples": 2, "bytes": shard_bytes, "sha256": "x",
                                        "content_sha256": "y", "duration_s": 3.0, "keys": ["k1", "k2"],
                                        "lengths": [16000, 32000], "offsets": [0, 0]}],
    }


def test_manifest_round_trip(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"0" * 10)
    write_manifest(tmp_path, manifest_payload(tmp_path, 10))

    manifest = read_manifest(tmp_path)

    assert isinstance(manifest, Manifest) and manifest.root == tmp_path and manifest.num_classes == 2
    assert manifest.shards[0].path == tmp_path / "s.tar" and manifest.shards[0].keys == ("k1", "k2")
    assert manifest.num_samples == 2 and manifest.shard_of_key() == {"k1": "s.tar", "k2": "s.tar"}


def test_read_manifest_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid shard manifest"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, manifest_payload(tmp_path, 10))
    with pytest.raises(FileNotFoundError, match="s.tar is listed"):
        read_manifest(tmp_path)
    (tmp_path / "s.tar").write_bytes(b"0" * 9)
    with pytest.raises(ValueError, match="9 bytes"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, check_files=False).shards[0].bytes == 10


def test_manifest_with_another_format_version_is_refused(tmp_path):
    write_manifest(tmp_path, manifest_payload(tmp_path, 10))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 2, found 99"):
        read_manifest(tmp_path, check_files=False)


def test_manifest_without_a_length_per_key_is_refused(tmp_path):
    payload = manifest_payload(tmp_path, 10)
    payload["shards"][0]["lengths"] = [16000]
    write_manifest(tmp_path, payload)
    with pytest.raises(ValueError, match="2 keys, 1 lengths and 2 offsets for 2 samples"):
        read_manifest(tmp_path, check_files=False)


def test_skipped_report_round_trip_keeps_one_line_per_row(tmp_path):
    skips = [Skip("a.csv:4", "k1", "missing", "no file"), Skip("a.csv:9", "k2", "unreadable", "bad\theader\nhere")]
    write_skipped(tmp_path, skips)
    lines = (tmp_path / "skipped.tsv").read_text().splitlines()
    assert len(lines) == 1 + len(skips)
    assert read_skipped(tmp_path) == [skips[0], Skip("a.csv:9", "k2", "unreadable", "bad header here")]


def test_fingerprint_depends_on_classes_names_and_content():
    base = compute_fingerprint(["/m/a"], [("s0.tar", "c0"), ("s1.tar", "c1")])
    assert base == compute_fingerprint(["/m/a"], [("s0.tar", "c0"), ("s1.tar", "c1")])
    assert base != compute_fingerprint(["/m/b"], [("s0.tar", "c0"), ("s1.tar", "c1")])
    assert base != compute_fingerprint(["/m/a"], [("s0.tar", "c0"), ("s1.tar", "cX")])
    assert base != compute_fingerprint(["/m/a"], [("s1.tar", "c1"), ("s0.tar", "c0")])


def test_pcm16_members_decode_to_exactly_the_flac_samples_and_hash_alike():
    wave = np.random.default_rng(3).uniform(-1.2, 1.2, 4000).astype(np.float32)
    flac, flac_digest = encode_audio(wave, "flac")
    pcm, pcm_digest = encode_audio(wave, "pcm16")
    assert flac_digest == pcm_digest and len(pcm) == 2 * len(wave)
    np.testing.assert_array_equal(decode_audio(pcm, "pcm16"), decode_audio(flac, "flac"))
    with pytest.raises(ValueError, match="codec 'mp3' unknown"):
        encode_audio(wave, "mp3")


@pytest.mark.parametrize("codec", ["flac", "pcm16"])
def test_a_shard_directory_in_either_codec_reads_the_same_clips_under_the_same_fingerprint(tmp_path, codec):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        soundfile.write(audio / f"c{i}.wav", rng.uniform(-0.5, 0.5, 8000 + 800 * i), SAMPLE_RATE, subtype="PCM_16")
    repo = Path(__file__).resolve().parents[1]
    outs = {}
    for name in ("flac", codec):
        outs[name] = tmp_path / f"shards_{name}"
        result = subprocess.run([sys.executable, "-m", "data_prep.folder", "--audio-dir", str(audio), "--out",
                                 str(outs[name]), "--codec", name, "--workers", "1", "--no-progress"],
                                cwd=repo, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    manifests = {name: read_manifest(out) for name, out in outs.items()}
    assert manifests[codec].codec == codec
    assert manifests[codec].fingerprint == manifests["flac"].fingerprint  # the same samples
    clips = {name: [c for s in m.shards for c in iter_shard(s.path)] for name, m in manifests.items()}
    assert [c.key for c in clips[codec]] == [c.key for c in clips["flac"]]
    for a, b in zip(clips[codec], clips["flac"]):
        np.testing.assert_array_equal(a.waveform, b.waveform)
    with tarfile.open(manifests[codec].shards[0].path) as tar:
        assert {name.rsplit(".", 1)[1] for name in tar.getnames()} == {codec, "json"}


def test_data_prep_on_a_directory_of_the_format_before_chunks_says_to_rerun_in_one_line(tmp_path):
    """Manifest format 1 listed no sample lengths; data_prep refuses such a directory with one line (exit 2) instead
    of a traceback, and `--overwrite` rebuilds it."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(2):
        soundfile.write(audio / f"c{i}.wav", np.full(8000, 0.1 * (i + 1), np.float32), 16000)
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "data_prep.folder", "--audio-dir", str(audio), "--out", str(out), "--workers",
               "1", "--no-progress"]
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run(command, cwd=repo, capture_output=True, timeout=120).returncode == 0
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**raw, "format_version": 1}))

    refused = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "written by an older data_prep" in refused.stderr and "--overwrite" in refused.stderr
    rebuilt = subprocess.run(command + ["--overwrite"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0 and read_manifest(out).num_samples == 2, rebuilt.stderr
