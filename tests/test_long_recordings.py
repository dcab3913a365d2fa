"""Long recordings: data_prep cuts them into pieces while it streams them, and the teacher pass and distillation use
every 10 s chunk of every sample, each with its own views and store rows, replayed bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tracemalloc

import numpy as np
import pytest
import soundfile
import torch

from ced_train.audio import SAMPLE_RATE, AudioSource, load_audio
from ced_train.augment import AugmentConfig
from ced_train.data import iter_shard, read_manifest
from ced_train.data.shards import encode_audio
from ced_train.data.chunks import chunk_count, chunk_rng_key
from ced_train.labels import load_class_labels
from ced_train.lightning.data import collate_distill
from ced_train.rendering import ViewRenderer
from ced_train.stages.teach import teacher_pass
from ced_train.store import TeacherStore, verify
from ced_train.teachers import TeacherEnsemble
from ced_train.views import ViewDataset, collate_items
from data_prep.folder import folder_inputs
from data_prep.sharding import SourceRow, build_shards, encode_row
from helpers import HashTeacher

CHUNK = 10 * SAMPLE_RATE
VIEWS = 2


def write_noise(path, seconds: float, rate: int = SAMPLE_RATE, seed: int = 0, channels: int = 1) -> None:
    """Noise whose level changes every 0.1 s, so that every chunk and every shift differs."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * rate)
    level = np.repeat(rng.uniform(0.02, 0.5, frames // (rate // 10) + 1), rate // 10)[:frames]
    data = (rng.standard_normal((frames, channels)) * level[:, None]).astype(np.float32).clip(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, data, rate, subtype="PCM_16")


def test_chunk_count_keeps_a_last_chunk_of_at_least_half_and_every_first_chunk():
    assert [chunk_count(n, CHUNK) for n in (95 * SAMPLE_RATE, 10 * SAMPLE_RATE, 3 * SAMPLE_RATE, 0)] == [10, 1, 1, 0]
    assert chunk_count(35 * SAMPLE_RATE, CHUNK, offset_samples=60 * SAMPLE_RATE) == 4  # 3 + a last one of 5 s
    assert chunk_count(CHUNK // 2 - 1, CHUNK, offset_samples=60 * SAMPLE_RATE) == 0  # a tail under half a chunk
    assert chunk_count(24 * SAMPLE_RATE, CHUNK) == 2  # 4 s left over: dropped
    assert chunk_rng_key("rec", 0) == "rec" and chunk_rng_key("rec", 3) == "rec#3"


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    """A folder with a 95 s recording (22.05 kHz stereo), a file literally named like its second piece, and a 4 s
    clip; sharded with 60 s pieces, and a hash-teacher store of it."""
    root = tmp_path_factory.mktemp("long")
    audio = root / "audio"
    write_noise(audio / "rec.wav", 95.0, rate=22050, channels=2, seed=1)
    write_noise(audio / "rec-p0001.wav", 3.0, seed=2)
    write_noise(audio / "short.wav", 4.0, seed=3)
    classes = load_class_labels()
    inputs, _ = folder_inputs(audio, classes, None)
    shards = root / "shards"
    report = build_shards(inputs, shards, classes, tool="test", labelled=False, samples_per_shard=3, workers=1,
                          progress=False, piece_s=60.0)
    augment = AugmentConfig(mixup_prob=0.75, mixup_block_clips=4)
    store = root / "store.h5"
    teacher_pass(shards, store, TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}]), augment, seed=0,
                 num_views=VIEWS, batch_size=3, progress=False)
    return {"audio": audio, "shards": shards, "store": store, "report": report}


def test_a_long_file_is_cut_into_pieces_with_keys_no_other_file_can_take(long_folder):
    manifest = read_manifest(long_folder["shards"])
    report = long_folder["report"]
    assert (report.num_rows, report.num_written, report.num_samples) == (3, 3, 4)
    samples = {key: (length, offset) for shard in manifest.shards
               for key, length, offset in zip(shard.keys, shard.lengths, shard.offsets)}
    literal = [key for key in samples if key.startswith("rec-p0001-")]
    assert len(literal) == 1 and set(samples) == {"rec-p0000", "rec-p0001", literal[0], "short"}
    assert samples["rec-p0000"] == (60 * SAMPLE_RATE, 0) and samples["rec-p0001"] == (35 * SAMPLE_RATE, 60 * SAMPLE_RATE)
    records = {}
    for shard in manifest.shards:
        with tarfile.open(shard.path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    records[record["key"]] = record
    assert {k: records["rec-p0001"][k] for k in ("piece", "pieces", "offset_s", "source_file")} == {
        "piece": 1, "pieces": 2, "offset_s": 60.0, "source_file": "rec.wav"}
    assert "piece" not in records["short"] and records[literal[0]]["source_file"] == "rec-p0001.wav"
    # The pieces together are the whole file as decoded in one go, sample for sample in the shards' 16-bit storage.
    clips = {clip.key: clip.waveform for shard in manifest.shards for clip in iter_shard(shard.path, dtype="int16")}
    whole = load_audio(long_folder["audio"] / "rec.wav").waveform
    pieces = np.concatenate([clips["rec-p0000"], clips["rec-p0001"]])
    assert pieces.tobytes() == encode_audio(whole, "pcm16")[0]


def test_a_95_s_file_yields_10_chunks_all_in_the_store_all_replayed_exactly(long_folder):
    shards, store_path = long_folder["shards"], long_folder["store"]
    assert verify(store_path, shards)["coverage"] == 1.0
    with TeacherStore(store_path) as store:
        rows = list(zip(store.keys(), store.chunks().tolist()))
    rec_rows = sorted(row for row in rows if row[0] in ("rec-p0000", "rec-p0001"))
    assert rec_rows == [("rec-p0000", c) for c in range(6)] + [("rec-p0001", c) for c in range(4)]  # 9 full + 5 s
    assert len(rows) == 12  # and one chunk each of the 3 s and 4 s files

    clips = {clip.key: clip.waveform for shard in read_manifest(shards).shards
             for clip in iter_shard(shard.path, dtype="int16")}
    dataset = ViewDataset(shards, store=store_path)
    seen = set()
    for epoch in range(VIEWS):
        dataset.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_items):
            _, replayed = HashTeacher()(ViewRenderer()(batch["inputs"])).topk(20)
            assert torch.equal(replayed, batch["topk_indices"]), batch["key"]
            seen.update(zip(batch["key"], batch["chunk"].tolist(), batch["view"].tolist()))
    assert seen == {(key, chunk, view) for key, chunk in rows for view in range(VIEWS)}

    # Training batches name each chunk apart (`key#chunk`), so a sample's chunks are never mistaken for one another.
    items = list(dataset.render(0, dataset.num_rows))
    assert sorted(collate_distill(items).keys) == sorted(chunk_rng_key(key, chunk) for key, chunk in rows)
    # The last chunk of the second piece is its final 5 s, zero-padded to 10 s.
    item = next(item for item in items if (item["key"], item["chunk"]) == ("rec-p0001", 3))
    np.testing.assert_array_equal(item["waveform"][: CHUNK // 2], clips["rec-p0001"][3 * CHUNK :])
    assert not item["waveform"][CHUNK // 2 :].any()


def test_every_chunk_draws_its_own_views(long_folder):
    with TeacherStore(long_folder["store"]) as store:
        keys, chunks = store.keys(), store.chunks().tolist()
        params = store.read(0, 0, store.num_rows)[2]
    rec = [i for i, key in enumerate(keys) if key == "rec-p0000"]
    assert len({params[i].tobytes() for i in rec}) == len(rec)  # six chunks, six different views
    assert [chunk_rng_key(keys[i], chunks[i]) for i in rec] == ["rec-p0000"] + [f"rec-p0000#{c}" for c in range(1, 6)]


def peak_bytes_of_encoding(path, tmp_path, piece_samples: int) -> tuple[int, list]:
    row = SourceRow(path.name, path.stem, path, path.name)
    spill = tmp_path / f"spill_{path.stem}"
    spill.mkdir()
    tracemalloc.start()
    try:
        encoded = encode_row(row, "pcm16", piece_samples=piece_samples, spill_dir=spill)
        return tracemalloc.get_traced_memory()[1], encoded
    finally:
        tracemalloc.stop()


def write_long(path, seconds: float, seed: int):
    """Noise at 22.05 kHz as `path`: a WAV, or through ffmpeg a Matroska file that only ffmpeg decodes."""
    wav = path.with_suffix(".wav")
    write_noise(wav, seconds, rate=22050, seed=seed)
    if path.suffix != ".wav":
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), "-c:a", "pcm_s16le", str(path)],
                       check=True, timeout=60)
        wav.unlink()


@pytest.mark.parametrize("ext", [".wav", pytest.param(".mka", marks=pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="the ffmpeg path needs the ffmpeg binary"))])
def test_decoding_streams_in_blocks_equal_to_the_whole_file_with_memory_bounded_by_the_piece(tmp_path, ext):
    short, long = tmp_path / f"short{ext}", tmp_path / f"long{ext}"
    write_long(short, 100.0, seed=4)
    write_long(long, 480.0, seed=5)  # 8 min: 31 MB as float32 at 16 kHz
    assert AudioSource.open(long).via_ffmpeg == (ext != ".wav")
    whole = load_audio(long).waveform
    blocks = list(AudioSource.open(long).blocks(7 * SAMPLE_RATE))
    assert {len(b) for b in blocks[:-1]} == {7 * SAMPLE_RATE}
    np.testing.assert_array_equal(np.concatenate(blocks), whole)

    piece = 10 * SAMPLE_RATE
    short_peak, _ = peak_bytes_of_encoding(short, tmp_path, piece)
    long_peak, encoded = peak_bytes_of_encoding(long, tmp_path, piece)
    assert len(encoded) == 48 and all(not isinstance(clip.audio, bytes) for clip in encoded)  # spilled to disk
    # The peak does not grow with the file (4.8 times longer) and stays far below decoding it whole.
    assert long_peak < 1.2 * short_peak and long_peak < whole.nbytes / 2, (short_peak, long_peak)
    stored = b"".join(clip.audio_bytes() for clip in encoded)
    assert stored == encode_audio(whole, "pcm16")[0] and not list(tmp_path.glob("spill_long/*"))  # spills consumed
