"""The paper's released teacher outputs (RicherMans/CED `save_logits.py`): reading their layout and re-deriving each
stored view from its seed, checked against outputs of the reference code itself (tests/fixtures/official_logits,
made by its make_official_logits.py at batch size 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from ced_train.__main__ import compose, run_stages
from ced_train.audio import SAMPLE_RATE
from ced_train.augment import apply, params_to_columns
from ced_train.data.chunks import chunk_rng_key
from ced_train.labels import load_class_labels
from ced_train.models.frontend import LogMelFrontEnd, num_frames
from ced_train.rendering import ViewRenderer
from ced_train.store import StoreError, TeacherStore, info, verify
from ced_train.store.official import import_official, official_parts, official_view, read_official_part
from ced_train.views import ViewDataset, collate_items
from data_prep.sharding import SourceRow, build_shards

FIXTURE = Path(__file__).parent / "fixtures" / "official_logits"
REPO = Path(__file__).resolve().parents[1]


def test_seed_draws_equal_the_reference_global_generator_of_torch_2_0_1():
    """(seed, chunk length) → (shift applied, shift, u1, u2), as the reference's call sequence drew them with torch
    2.0.1's global generator (its era); 40 pairs, lengths odd and even, seeds up to 2^31 - 1."""
    draws = json.loads((FIXTURE / "draws_torch2.0.1.json").read_text())
    assert len(draws) == 40
    for name, (applied, shift, u1, u2) in draws.items():
        seed, length = map(int, name.split("_"))
        view = official_view(seed, length, time_frames=1001)
        assert view.shift_samples == shift and (shift != 0 or not applied), name
        time_width = int((torch.tensor([u1]) * 192).long())
        freq_width = int((torch.tensor([u1]) * 24).long())
        assert (view.time_mask_frames, view.freq_mask_bins) == (time_width, freq_width), name
        assert view.time_mask_start == int((torch.tensor([u2]) * (1001 - torch.tensor([u1]) * 192)).long()), name


def fixture_rows() -> dict[tuple[int, int], dict]:
    return {(row["epoch"], row["row"]): row for row in json.loads((FIXTURE / "rows.json").read_text())}


def test_the_released_layout_is_read_view_by_view_with_its_clip_names_and_times():
    parts = [read_official_part(path) for path in official_parts(FIXTURE / "logits")]
    assert [(part.view, part.rank) for part in parts] == [(1, 0), (2, 0)]
    rows = fixture_rows()
    for part in parts:
        assert len(part) == 6 and part.topk_values.shape == part.topk_indices.shape == (6, 20)
        assert (np.diff(part.topk_values.astype(np.float32), axis=1) <= 0).all()
        for i, (name, start, end, seed) in enumerate(zip(part.filenames, part.starts_s, part.ends_s, part.seeds)):
            row = rows[(part.view, i)]
            assert (name, float(start), float(end), int(seed)) == (row["filename"], row["start"], row["end"],
                                                                  row["seed"])


def test_re_derived_views_reproduce_the_inputs_the_reference_teacher_saw():
    """Every row of both views: its chunk rolled by the re-derived sample shift, through this project's front end,
    masked by `augment.apply` with the re-derived masks, equals the masked log-mel the reference fed its teacher
    (stored as float16, hence the tolerance; at batch size 1 the reference's per-batch dB floor is the clip's own)."""
    expected = np.load(FIXTURE / "expected.npz")
    rows = fixture_rows()
    front_end = LogMelFrontEnd()
    shifted = 0
    for path in official_parts(FIXTURE / "logits"):
        part = read_official_part(path)
        for i, (name, start, end, seed) in enumerate(zip(part.filenames, part.starts_s, part.ends_s, part.seeds)):
            audio, rate = soundfile.read(FIXTURE / "audio" / Path(name).with_suffix(".flac").name, dtype="float32")
            assert rate == SAMPLE_RATE
            chunk = audio[round(float(start) * SAMPLE_RATE) : round(float(end) * SAMPLE_RATE)]
            view = official_view(int(seed), len(chunk), time_frames=num_frames(len(chunk)))
            row = rows[(part.view, i)]
            assert (view.shift_samples, [view.time_mask_start, view.time_mask_start + view.time_mask_frames],
                    [view.freq_mask_start, view.freq_mask_start + view.freq_mask_bins]) == (
                row["shift_samples"], row["time_mask"], row["freq_mask"])
            shifted += view.shift_samples != 0
            mel_db = front_end(torch.from_numpy(np.roll(chunk, view.shift_samples))[None])
            rendered = apply(mel_db, params_to_columns(view.params()[None]), mel_db)[0]
            reference = torch.from_numpy(expected[f"ep{part.view}_row{i}"].astype(np.float32))
            assert rendered.shape == reference.shape
            masked = reference == 0
            assert torch.equal(rendered == 0, masked), (part.view, i)
            # float16 rounds by up to 1/32 dB in [64, 128) dB of magnitude (measured here: at most 0.016)
            torch.testing.assert_close(rendered, reference, atol=0.035, rtol=0)
    assert shifted >= 3  # the fixture exercises the shift, not only the masks


def test_a_part_without_its_parquet_or_with_rows_that_disagree_is_one_error_naming_it(tmp_path):
    logits = tmp_path / "logits"
    shutil.copytree(FIXTURE / "logits", logits)
    (logits / "logits_ep2_0.parquet").unlink()
    with pytest.raises(StoreError, match=r"logits_ep2_0.h5: no logits_ep2_0.parquet beside it"):
        read_official_part(logits / "logits_ep2_0.h5")
    import h5py

    with h5py.File(logits / "logits_ep1_0.h5", "r+") as file:
        seeds = file["seeds"][...]
        del file["seeds"]
        file["seeds"] = seeds[:-1]
    with pytest.raises(StoreError, match=r"logits_ep1_0.h5: .* do not describe the same rows"):
        read_official_part(logits / "logits_ep1_0.h5")
    with pytest.raises(StoreError, match="holds no logits_ep"):
        official_parts(tmp_path)


def fixture_shards(out: Path, clips: dict[str, Path]) -> Path:
    """Labelled shards of `clips` (key -> audio file), clip i labelled with class i, as data_prep writes them."""
    classes = load_class_labels()
    rows = [SourceRow(key, key, path, path.name, (i,), (classes.mids[i],)) for i, (key, path) in enumerate(clips.items())]
    build_shards(rows, out, classes, tool="test", labelled=True, samples_per_shard=3, workers=1, progress=False)
    return out


def release_clips() -> dict[str, Path]:
    return {path.stem: path for path in sorted((FIXTURE / "audio").glob("clip_*.flac"))}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """The fixture's release imported onto shards of its four clips (the 10, 7.3, 16 and 23.5 s files: 6 chunks)."""
    root = tmp_path_factory.mktemp("official")
    shards = fixture_shards(root / "shards", release_clips())
    report = import_official(FIXTURE / "logits", shards, root / "paper.h5", time_axis="chunk", progress=False)
    return {"root": root, "shards": shards, "store": report.store, "report": report}


def test_the_import_covers_every_chunk_and_verifies(imported):
    report = imported["report"]
    assert (report.rows, report.views, report.chunks, report.release_rows, report.left_out) == (6, 2, 6, 6, [])
    summary = verify(imported["store"], imported["shards"])
    assert summary["view_source"] == "official:chunk" and summary["coverage"] == 1.0
    with TeacherStore(imported["store"]) as store:
        assert sorted(zip(store.keys(), store.chunks().tolist())) == [
            ("clip_a", 0), ("clip_b", 0), ("clip_c", 0), ("clip_c", 1), ("clip_d", 0), ("clip_d", 1)]


def test_imported_views_replay_the_reference_teacher_inputs_and_targets(imported):
    """Distillation's data path on the imported store renders, for every stored (chunk, view), the input the
    reference's teacher saw (its first frames for chunks under 10 s, which this project pads to 10 s: the reference
    batch of one held the chunk alone) and carries that row's released top-20."""
    expected = np.load(FIXTURE / "expected.npz")
    rows = {(Path(row["filename"]).stem, round(row["start"] / 10), row["epoch"] - 1): row
            for row in json.loads((FIXTURE / "rows.json").read_text())}
    parts = {part.view - 1: part for part in map(read_official_part, official_parts(FIXTURE / "logits"))}
    dataset, seen = ViewDataset(imported["shards"], store=imported["store"]), set()
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_items):
            rendered = ViewRenderer()(batch["inputs"])
            for i, (key, chunk, view) in enumerate(zip(batch["key"], batch["chunk"].tolist(), batch["view"].tolist())):
                row = rows[(key, chunk, view)]
                reference = torch.from_numpy(expected[f"ep{view + 1}_row{row['row']}"].astype(np.float32))
                frames = row["frames"] - (2 if row["frames"] < 1001 else 0)  # the last 2 frames see the padding
                torch.testing.assert_close(rendered[i, :, :frames], reference[:, :frames], atol=0.035, rtol=0)
                part = parts[view]
                assert torch.equal(batch["topk_indices"][i], torch.from_numpy(part.topk_indices[row["row"]]).long())
                seen.add((key, chunk, view))
    assert len(seen) == 12


def test_release_rows_without_a_shard_chunk_and_chunks_without_a_row_are_each_reported(tmp_path):
    clips = release_clips()
    del clips["clip_d"]  # its 2 rows in each view match no shard sample
    extra = tmp_path / "clip_e.flac"
    soundfile.write(extra, np.zeros(4 * SAMPLE_RATE, np.float32) + 0.01, SAMPLE_RATE, subtype="PCM_16")
    shards = fixture_shards(tmp_path / "shards", {**clips, "clip_e": extra})  # a chunk the release lacks
    store = tmp_path / "paper.h5"
    result = subprocess.run([sys.executable, "-m", "ced_train.store", "import-official", str(FIXTURE / "logits"),
                             "--shards", str(shards), "--out", str(store), "--time-axis", "chunk", "--no-progress"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    accounting = tmp_path / "paper.left_out.tsv"
    assert f"left out: 1 uncovered chunks, 4 unmatched rows (listed in {accounting})" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"store: {store}"
    lines = accounting.read_text().splitlines()
    assert lines[0] == "kind\twhere\tdetail" and len(lines) == 6
    assert sum(line.startswith("unmatched row\tlogits_ep") and "clip_d.flac" in line for line in lines) == 4
    assert "uncovered chunk\tclip_e#0\t" in "\n".join(lines)
    with TeacherStore(store) as opened:
        assert opened.num_rows == 4
    assert info(store)["left_out"] == {"unmatched row": 4, "uncovered chunk": 1}
    assert info(store)["teacher_precision"] == "not recorded"
    again = subprocess.run([sys.executable, "-m", "ced_train.store", "import-official", str(FIXTURE / "logits"),
                            "--shards", str(shards), "--out", str(store)], capture_output=True, text=True, timeout=120,
                           cwd=REPO)
    assert again.returncode == 1 and again.stderr.strip() == f"error: --out {store} exists; pass --overwrite to replace it"


def test_a_changed_seed_fails_verify_naming_the_row(imported, tmp_path):
    store = tmp_path / "edited.h5"
    shutil.copy(imported["store"], store)
    import h5py

    with h5py.File(store, "r+") as file:
        file["seeds"][1, 2] += 1
        name = chunk_rng_key(file["keys"][2].decode(), int(file["chunks"][2]))
    with pytest.raises(StoreError, match=rf"1 of 12 re-drawn parameter records differ .*: {name}/view 1$"):
        verify(store, imported["shards"])


def test_a_shrunk_distillation_from_the_imported_store_runs(imported, tmp_path):
    cfg = compose(["~local", "stages=[distill]", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                   f"data.train_shards={imported['shards']}", f"data.val_shards={imported['shards']}",
                   f"store.path={imported['store']}", "teachers=checkpoints", "teachers.name=paper",
                   "teachers.checkpoints=[]", "data.batch_size=2", "data.eval_batch_size=2",
                   "model@distill.model=ced_test", "distill.trainer.max_epochs=2",
                   "distill.trainer.check_val_every_n_epoch=1", "distill.optim.scheduler.warmup_steps=1",
                   "callbacks.average_best.num_best=1", f"distill.out_dir={tmp_path}/distill", "trainer=cpu",
                   "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv"])
    results, _ = run_stages(cfg)
    assert results["distill"]["steps"] == 2 * 3  # 6 chunk rows // 2 per epoch
    assert (tmp_path / "distill" / "student.ckpt").is_file()


def test_release_rows_find_audioset_shard_keys_by_youtube_id_whatever_the_file_names(tmp_path):
    """AudioSet shards are keyed `<YTID>_<start ms>` and the reference named clips by its own file names: rows are
    matched through the YouTube id when the base names differ (here `Y<id>_<start>_<end>.wav` in the release,
    `<id>_<start>.flac` downloads)."""
    import pyarrow
    import pyarrow.parquet

    from data_prep.audioset import AudioIndex, read_segments

    ytids = {"clip_a": "aaaaaaaaaaa", "clip_b": "b-b_bbbbbbb"}  # the two clips of at most 10 s
    audio = tmp_path / "audio"
    audio.mkdir()
    for name, ytid in ytids.items():
        shutil.copy(FIXTURE / "audio" / f"{name}.flac", audio / f"{ytid}_30.000.flac")
    csv = tmp_path / "balanced_train_segments.csv"
    csv.write_text("# Segments csv\n# num_ytids=2\n# YTID, start_seconds, end_seconds, positive_labels\n"
                   + "".join(f'{ytid}, 30.000, 40.000, "/m/09x0r"\n' for ytid in ytids.values()))
    classes = load_class_labels()
    shards = tmp_path / "shards"
    build_shards(read_segments([csv], AudioIndex(audio), classes), shards, classes, tool="data_prep.audioset",
                 labelled=True, workers=1, progress=False)
    logits = tmp_path / "logits"
    shutil.copytree(FIXTURE / "logits", logits)
    for table_path in logits.glob("*.parquet"):
        table = pyarrow.parquet.read_table(table_path)
        names = [f"Y{ytids[Path(name).stem]}_30.000_40.000.wav" if Path(name).stem in ytids else name
                 for name in table["filename"].to_pylist()]
        table = table.set_column(table.schema.get_field_index("filename"), "filename", pyarrow.array(names))
        pyarrow.parquet.write_table(table, table_path)

    report = import_official(logits, shards, tmp_path / "paper.h5", time_axis="chunk", progress=False)

    assert report.rows == 2 and report.counts() == {"unmatched row": 8}  # clip_c and clip_d: 4 rows in each view
    with TeacherStore(report.store) as store:
        assert sorted(store.keys()) == ["aaaaaaaaaaa_30000", "b-b_bbbbbbb_30000"]
    verify(report.store, shards)
