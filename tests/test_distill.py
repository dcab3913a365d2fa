"""Distillation: the losses, the replayed batches (exactly what the teachers saw, no labels, view epoch mod V), the
three kinds of views (`distill.views`), exact resume of the distill stage, and reuse of its export."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ced_train.__main__ import StageError, compose, run_stages
from ced_train.lightning.batches import DistillBatch
from ced_train.lightning.data import ViewsDataModule
from ced_train.lightning.fit import StageOutputError, read_provenance
from ced_train.lightning.losses import TopKBCE, TopKKL, dense_targets
from ced_train.lightning.module import TaggerModule
from ced_train.models import create_model
from ced_train.rendering import ViewRenderer
from ced_train.stages.distill import PRIOR_FLOOR, head_prior
from ced_train.store import TeacherStore, topk_to_dense
from ced_train.teachers import load_ensemble
import helpers
from helpers import make_shards

VIEWS = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two random `ced_test` teachers, the store of a 3-view teacher pass (2 s chunks) over 21 labelled clips of 2 s
    (one chunk each) in 3 shards, also the validation set here, written by the app's teach stage."""
    root = tmp_path_factory.mktemp("distill")
    train_shards = make_shards(root / "train", [2.0] * 21, samples_per_shard=8)
    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        teachers.append(str(root / f"teacher{seed}.pt"))
        torch.save({"model": create_model("ced_test").state_dict()}, teachers[-1])
    overrides = [
        f"paths.root_dir={root}", f"paths.output_dir={root}/run", f"paths.store_dir={root}/store",
        f"data.train_shards={train_shards}", f"data.val_shards={train_shards}",
        "data.batch_size=4", "data.eval_batch_size=8",
        "teachers=checkpoints", "teachers.name=random", f"teachers.checkpoints=[{teachers[0]},{teachers[1]}]",
        f"teach.views={VIEWS}", "teach.batch_size=16", "teach.progress=false", "augment.clip_samples=32000",
        "model@distill.model=ced_test", "distill.trainer.max_epochs=2", "distill.trainer.check_val_every_n_epoch=1",
        "distill.optim.scheduler.warmup_steps=2", "callbacks.average_best.num_best=2",
        "trainer=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv",
    ]
    cfg = compose(["~local", "stages=[teach]", *overrides])
    run_stages(cfg)
    return {"root": root, "overrides": overrides, "store": cfg.store.path, "teachers": teachers,
            "shards": str(train_shards)}


def distill_cfg(tiny, out_dir, *extra):
    """The distill stage writing to `out_dir`, its CSV logs to `out_dir/logs/<run name>/version_<n>`."""
    return compose(["~local", "stages=[distill]", *tiny["overrides"], f"distill.out_dir={out_dir}",
                    f"paths.output_dir={out_dir}/logs", *extra])


def datamodule(tiny, views="replay", num_workers=0) -> ViewsDataModule:
    dm = ViewsDataModule(tiny["shards"], tiny["shards"], batch_size=4, eval_batch_size=8, seed=0,
                         store=tiny["store"], views=views, fresh_seed=99, num_workers=num_workers)
    dm.setup("fit")
    return dm


def epoch_batches(dm: ViewsDataModule, epoch: int) -> list[DistillBatch]:
    loader = dm.train_dataloader()
    dm.set_epoch(epoch)  # as the module does at the start of every epoch
    return list(loader)


def test_dense_targets_scatter_topk_and_fill_the_rest():
    values = torch.tensor([[0.9, 0.5]])
    indices = torch.tensor([[3, 0]])
    zero = dense_targets(values, indices, num_classes=5, fill="zero")
    assert torch.equal(zero, torch.tensor([[0.5, 0.0, 0.0, 0.9, 0.0]]))
    # mean_rest (CED's last_mean): the smallest top-k value spread over the 3 other classes
    rest = dense_targets(values, indices, num_classes=5, fill="mean_rest")
    assert torch.allclose(rest, torch.tensor([[0.5, 0.5 / 3, 0.5 / 3, 0.9, 0.5 / 3]]))
    with pytest.raises(ValueError, match="fill"):
        TopKBCE(fill="ones")


def test_topk_bce_equals_bce_on_the_dense_targets():
    batch = DistillBatch(torch.zeros(1), torch.tensor([[0.8, 0.3]]), torch.tensor([[1, 2]]), torch.tensor([0]), ["k"])
    logits = torch.tensor([[0.0, 2.0, -1.0, -3.0]])
    targets = torch.tensor([[0.0, 0.8, 0.3, 0.0]])
    expected = -(targets * torch.log(logits.sigmoid()) + (1 - targets) * torch.log(1 - logits.sigmoid())).mean()
    assert TopKBCE()(logits, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_topk_kl_vanishes_when_the_student_matches_the_teacher():
    batch = DistillBatch(torch.zeros(1), torch.tensor([[0.9, 0.6, 0.2]]), torch.tensor([[0, 1, 2]]),
                         torch.tensor([0]), ["k"])
    teacher_logits = torch.logit(torch.tensor([[0.9, 0.6, 0.2]]))
    loss = TopKKL(temperature=2.0)
    assert loss(teacher_logits, batch).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(torch.zeros(1, 3), batch).item() > 1e-3


def test_replayed_batches_are_exactly_what_the_teachers_saw_and_hold_no_labels(tiny):
    ensemble = load_ensemble(tiny["teachers"])
    dm = datamodule(tiny)
    for epoch in (0, 4):
        batches = list(epoch_batches(dm, epoch))
        assert len(batches) == dm.num_batches == 5  # 21 chunks // 4 (one rank)
        for batch in batches[:2]:
            assert isinstance(batch, DistillBatch) and not hasattr(batch, "labels")
            assert set(batch.views.tolist()) == {epoch % VIEWS}
            values, indices = ensemble(ViewRenderer()(batch.inputs)).topk(5, dim=1)
            assert torch.equal(indices, batch.topk_indices[:, :5])
            assert torch.allclose(values, batch.topk_values[:, :5], atol=2e-3)  # stored as float16


def test_fresh_views_are_new_inputs_against_the_same_stored_targets(tiny):
    replay, fresh = datamodule(tiny), datamodule(tiny, views="fresh")
    by_key = {}
    for batch in epoch_batches(replay, 1):
        for i, (key, mel_db) in enumerate(zip(batch.keys, ViewRenderer()(batch.inputs), strict=True)):
            by_key[key] = (mel_db, batch.topk_indices[i], batch.views[i])
    differing = 0
    for batch in epoch_batches(fresh, 1):
        for i, (key, fresh_mel_db) in enumerate(zip(batch.keys, ViewRenderer()(batch.inputs), strict=True)):
            mel_db, indices, view = by_key[key]
            assert torch.equal(batch.topk_indices[i], indices) and batch.views[i] == view
            differing += not torch.equal(fresh_mel_db, mel_db)
    assert differing >= 16  # fresh shifts, masks and partners: (almost) every input differs


def test_fresh_views_with_the_store_seed_are_still_not_the_stored_views(tiny):
    """`distill.views=fresh` draws from its own stream: even `fresh_seed` equal to the teacher pass's seed gives
    other views than the stored ones."""
    stored = _params_by_key(datamodule(tiny))
    dm = ViewsDataModule(tiny["shards"], tiny["shards"], batch_size=4, eval_batch_size=8, seed=0,
                         store=tiny["store"], views="fresh", fresh_seed=0)
    dm.setup("fit")
    fresh = _params_by_key(dm)
    assert fresh.keys() == stored.keys()
    assert all(fresh[key] != stored[key] for key in fresh)


def _params_by_key(dm: ViewsDataModule) -> dict[tuple[str, int], dict]:
    """View parameters of epoch 1 by (sample key, chunk)."""
    dm.set_epoch(1)
    return {(item["key"], item["chunk"]): item["params"] for item in dm.train_set}


MASKS = ("time_mask_start", "time_mask_frames", "freq_mask_start", "freq_mask_bins")
MIXUP = ("partner_row", "partner_weight_q")


def test_reference_views_have_no_shift_fresh_masks_and_the_stored_mixup(tiny):
    """RicherMans/CED's `disable_consistency`: the shift goes, SpecAugment is redrawn (the draws of `fresh`), and the
    mixup partner and weight stored with the view stay, as do the targets."""
    stored, fresh = _params_by_key(datamodule(tiny)), _params_by_key(datamodule(tiny, "fresh"))
    reference = _params_by_key(datamodule(tiny, "reference"))
    assert reference.keys() == stored.keys()
    assert any(p["shift_frames"] for p in stored.values()) and any(p["partner_row"] >= 0 for p in stored.values())
    assert all(p["shift_frames"] == 0 for p in reference.values())
    assert all({n: p[n] for n in MIXUP} == {n: stored[k][n] for n in MIXUP} for k, p in reference.items())
    assert all({n: p[n] for n in MASKS} == {n: fresh[k][n] for n in MASKS} for k, p in reference.items())
    assert sum({n: p[n] for n in MASKS} != {n: stored[k][n] for n in MASKS} for k, p in reference.items()) >= 18

    targets = {key: indices for batch in epoch_batches(datamodule(tiny), 1)
               for key, indices in zip(batch.keys, batch.topk_indices, strict=True)}
    for batch in epoch_batches(datamodule(tiny, "reference"), 1):
        assert torch.equal(batch.inputs.params["shift_frames"], torch.zeros(len(batch.keys), dtype=torch.int64))
        assert all(torch.equal(indices, targets[key]) for key, indices in zip(batch.keys, batch.topk_indices))


def test_an_unknown_views_value_is_refused_in_one_line_and_the_old_switch_is_gone(tiny, tmp_path):
    with pytest.raises(StageError, match=r"^stage distill: distill.views='consistent': expected one of replay, fresh, "
                                         r"reference$") as error:
        run_stages(distill_cfg(tiny, tmp_path, "distill.views=consistent"))
    assert isinstance(error.value.__cause__, ValueError)
    assert not (tmp_path / "student.ckpt").exists()
    with pytest.raises(Exception, match="consistent"):
        distill_cfg(tiny, tmp_path, "distill.consistent=false")


def test_distill_resumed_at_an_epoch_boundary_matches_the_uninterrupted_run(tiny, tmp_path):
    # One DataLoader worker: it copies the dataset when an epoch's iterator starts, so the resumed epoch's view
    # must be set before that, not only when the epoch's hooks run.
    straight = distill_cfg(tiny, tmp_path / "straight", "data.num_workers=1")
    run_stages(straight)
    # Stop after the first validation (any mAP beats the threshold), then resume from its last.ckpt.
    interrupted = distill_cfg(tiny, tmp_path / "resumed", "data.num_workers=1",
                              "+callbacks.early_stopping.stopping_threshold=0.0")
    first, _ = run_stages(interrupted)
    assert first["distill"]["epochs"] == 1  # epochs completed
    resumed = distill_cfg(tiny, tmp_path / "resumed", "data.num_workers=1", "distill.resume=auto",
                          "distill.overwrite=true")
    second, _ = run_stages(resumed)
    assert second["distill"]["resumed_from"].endswith("last.ckpt") and second["distill"]["epochs"] == 2

    def weights(root):
        return torch.load(root / "student" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    # Epoch e replayed view e mod V, before and after the interruption.
    for log, expected in (("straight/logs/default-distill/version_0", [0.0, 1.0]),
                          ("resumed/logs/default-distill/version_1", [1.0])):
        with open(tmp_path / log / "metrics.csv", newline="") as handle:
            assert [float(row["train/view"]) for row in csv.DictReader(handle) if row["train/view"]] == expected
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    exported_a = torch.load(tmp_path / "straight" / "student.ckpt", weights_only=True)["ced_model"]["state_dict"]
    exported_b = torch.load(tmp_path / "resumed" / "student.ckpt", weights_only=True)["ced_model"]["state_dict"]
    assert all(torch.equal(exported_a[key], exported_b[key]) for key in exported_a)


def test_distill_killed_mid_epoch_resumes_to_the_weights_of_the_uninterrupted_run(tiny, tmp_path):
    """Validation (and last.ckpt) every 2 steps across epochs of 5 batches; the run is SIGKILLed after step 6's
    checkpoint, in the middle of epoch 1. Two DataLoader workers: the resumed epoch must hand out the batches after
    the trained ones in the order of the uninterrupted run; resuming with one worker (another cut of the epoch's
    batches) is refused in one line."""
    schedule = ["data.num_workers=2", "distill.trainer.max_epochs=2", "+distill.trainer.val_check_interval=2",
                "distill.trainer.check_val_every_n_epoch=null"]
    run_stages(distill_cfg(tiny, tmp_path / "straight", *schedule))
    killed = tmp_path / "killed"
    overrides = [o for o in tiny["overrides"] if not o.startswith("paths.output_dir")]
    command = [sys.executable, "-m", "ced_train", "~local", "stages=[distill]", *overrides, *schedule,
               f"distill.out_dir={killed}", f"paths.output_dir={killed}/logs", f"hydra.run.dir={killed}/hydra",
               "+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=6"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    last = torch.load(killed / "student" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["epoch"] == 1  # mid-epoch: 1 of epoch 1's 5 batches trained
    assert not (killed / "student.ckpt").exists()

    other_cut = [o.replace("num_workers=2", "num_workers=1") for o in schedule]
    with pytest.raises(StageError, match=r"1 batches into epoch 1 .*data.num_workers=2 then, 1 now"):
        run_stages(distill_cfg(tiny, killed, *other_cut, "distill.resume=auto"))
    resumed, _ = run_stages(distill_cfg(tiny, killed, *schedule, "distill.resume=auto"))
    assert resumed["distill"]["resumed_from"].endswith("last.ckpt") and resumed["distill"]["steps"] == 10

    def state(root):
        checkpoint = torch.load(root / "student" / "checkpoints" / "last.ckpt", weights_only=False)
        return checkpoint["state_dict"], checkpoint["optimizer_states"][0]["state"]

    (weights_a, moments_a), (weights_b, moments_b) = state(tmp_path / "straight"), state(killed)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for index in moments_a:
        assert torch.equal(moments_a[index]["exp_avg"], moments_b[index]["exp_avg"]), index


def test_last_checkpoint_is_never_written_with_accumulated_gradients_pending(tiny, tmp_path):
    """Two batches per optimiser step over epochs of 5 batches, last.ckpt due every step: every last.ckpt a resumed
    run could start from follows an optimiser step (an even batch count, or the epoch's end), never the first half."""
    records = tmp_path / "records.jsonl"
    run_stages(distill_cfg(tiny, tmp_path, "+trainer.accumulate_grad_batches=2",
                           "callbacks.last_checkpoint.every_n_train_steps=1",
                           "+callbacks.record._target_=helpers.RecordLastCheckpoints", f"+callbacks.record.out={records}"))
    done = [json.loads(line)["batches_done_in_epoch"] for line in records.read_text().splitlines()]
    assert done and 2 in done and 5 in done
    assert all(count % 2 == 0 or count == 5 for count in done), done


def test_distill_reuses_an_export_of_equal_inputs_and_refuses_other_inputs(tiny, tmp_path):
    cfg = distill_cfg(tiny, tmp_path, "distill.trainer.max_epochs=1")
    first, _ = run_stages(cfg)
    assert first["distill"]["reused"] is False
    again, _ = run_stages(cfg)
    assert again["distill"]["reused"] is True
    assert again["distill"]["fingerprint"] == read_provenance(tmp_path / "student.ckpt")["fingerprint"]
    with pytest.raises(StageOutputError, match="distill.overwrite"):
        run_stages(distill_cfg(tiny, tmp_path, "distill.trainer.max_epochs=1", "distill.loss.fill=mean_rest"))
    assert math.isfinite(first["distill"]["best_val_mAP"])


def test_the_store_prior_starts_each_class_at_the_teachers_mean_probability(tiny, tmp_path):
    with TeacherStore(tiny["store"]) as store:
        means = store.mean_probabilities()
        dense = [topk_to_dense(*store.read(view, 0, store.num_rows)[:2], store.spec.num_classes)
                 for view in range(store.num_views)]
    assert np.allclose(means, np.concatenate(dense).mean(0), atol=1e-6)
    # The default (distill.head_bias_prior=store): the student's head, before any step, predicts those means.
    cfg = distill_cfg(tiny, tmp_path)
    assert cfg.distill.head_bias_prior == "store"
    prior = head_prior(cfg.distill.head_bias_prior, Path(cfg.store.path))
    module = TaggerModule(create_model("ced_test", pooling="logit"), "ced_test", TopKBCE(), torch.optim.AdamW,
                          head_bias_prior=prior)
    bias = module.model.outputlayer[-1].bias.detach().double()
    assert torch.allclose(bias.sigmoid(), torch.from_numpy(means).clamp(PRIOR_FLOOR, 1 - PRIOR_FLOOR), rtol=1e-4)
    assert (means > 0.05).sum() > 0 and (means == 0).sum() > 0  # teachers' favourites and never-ranked classes
    assert head_prior(0.01, Path(cfg.store.path)) == 0.01 and head_prior(None, Path(cfg.store.path)) is None
    with pytest.raises(ValueError, match="distill.head_bias_prior='stor'"):
        head_prior("stor", Path(cfg.store.path))


def test_distill_and_evaluate_run_under_bf16_autocast_on_the_cpu(tiny, tmp_path):
    # One epoch from random teachers leaves the logits of a class nearly equal across clips, so the bias matters: at
    # the store prior of a never-ranked class (logit -9.2) bf16 resolves logits to 0.06, at 0.01 (-4.6) to 0.03.
    results, _ = run_stages(distill_cfg(tiny, tmp_path, "distill.trainer.max_epochs=1", "trainer.precision=bf16-mixed",
                                        "distill.head_bias_prior=0.01"))
    assert math.isfinite(results["distill"]["best_val_mAP"])
    student = tmp_path / "student.ckpt"
    scores = {}
    for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        cfg = compose(["~local", "stages=[evaluate]", *tiny["overrides"], f"evaluate.checkpoint={student}",
                       f"data.eval_shards={tiny['shards']}", f"evaluate.precision={precision}",
                       f"evaluate.out_dir={tmp_path}/evaluate_{precision}"])
        evaluated = run_stages(cfg)[0]["evaluate"]
        assert evaluated["device"] == "cpu" and evaluated["precision"] == dtype
        scores[precision] = evaluated["systems"]["student"]
        assert scores[precision]["num_clips"] == 21
    # bf16 keeps 8 bits of mantissa: the ranking of 21 clips barely moves.
    assert abs(scores["bf16"]["mAP"] - scores["fp32"]["mAP"]) < 0.05


def test_three_process_ddp_teach_distill_evaluate_from_an_official_checkpoint(tiny, tmp_path):
    """`stages=[teach, distill, evaluate]` under DDP (Lightning re-runs the app in its child processes): 13 clips in
    5 unequal shards for training, 7 in 2 shards for validation and evaluation (fewer shards than ranks), the
    student initialised from an official-format file. Every rank trains the same batches count on disjoint clips,
    ends with the same weights, validation and evaluate score every clip once, and only rank 0 prints results."""
    train = make_shards(tmp_path / "train", [1.5] * 13, 3)
    held_out = make_shards(tmp_path / "eval", [1.5] * 7, 4)
    run_dir, out_dir, weights_dir = tmp_path / "run", tmp_path / "distill", tmp_path / "weights"
    overrides = [o for o in tiny["overrides"] if not o.startswith(("paths.output_dir", "trainer=", "data."))]
    command = [sys.executable, "-m", "ced_train", "~local", "stages=[teach,distill,evaluate]", *overrides,
               f"data.train_shards={train}", f"data.val_shards={held_out}", f"data.eval_shards={held_out}",
               f"paths.store_dir={tmp_path}/store", "data.batch_size=2", "data.eval_batch_size=2",
               "data.num_workers=2", f"distill.init_checkpoint={tiny['teachers'][0]}", f"distill.out_dir={out_dir}",
               f"evaluate.checkpoint={out_dir}/student.ckpt", "trainer=cpu", "trainer.devices=3",
               "trainer.strategy=ddp", f"hydra.run.dir={run_dir}",
               "+callbacks.weights._target_=helpers.SaveRankWeights", f"+callbacks.weights.dirpath={weights_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"results: {run_dir / 'results.json'}"
    assert sum(line.startswith("results:") for line in lines) == 1
    results = json.loads((run_dir / "results.json").read_text())["results"]
    # 13 // (3 ranks x 2) = 2 batches per rank and epoch, two epochs.
    assert results["distill"]["steps"] == 2 * 2
    assert results["distill"]["init"].startswith(f"init from {tiny['teachers'][0]}: loaded ")
    assert results["evaluate"]["systems"]["student"]["num_clips"] == 7
    with open(next(run_dir.glob("*/version_0/metrics.csv")), newline="") as handle:
        clips = [float(row["val/clips"]) for row in csv.DictReader(handle) if row.get("val/clips")]
    assert clips == [7.0, 7.0]
    saved = [torch.load(weights_dir / f"rank{rank}.pt") for rank in range(3)]
    ranks = [rank["weights"] for rank in saved]
    assert ranks[0].keys() == ranks[1].keys() == ranks[2].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]) and torch.equal(ranks[0][key], ranks[2][key]), key
    for epoch in range(2):  # 4 clips per rank and epoch, no clip on two ranks
        seen = [rank["keys"][epoch] for rank in saved]
        assert [len(keys) for keys in seen] == [4, 4, 4]
        assert len(set().union(*seen)) == 12
    assert (out_dir / "student.ckpt").is_file()


def test_persistent_workers_keep_their_processes_and_replay_each_epochs_exact_batches(tiny, tmp_path):
    """Three epochs with two DataLoader workers forked once: every epoch's batches are those of a loader made afresh
    for that epoch (its view, shuffle and order), from the same two worker processes."""
    records = tmp_path / "batches.jsonl"
    run_stages(distill_cfg(tiny, tmp_path / "run", "data.num_workers=2", "distill.trainer.max_epochs=3",
                           "distill.trainer.check_val_every_n_epoch=3", "+callbacks.record._target_=helpers.RecordTrainingBatches",
                           f"+callbacks.record.out={records}"))
    seen = [json.loads(line) for line in records.read_text().splitlines()]
    dm = datamodule(tiny, num_workers=2)
    for epoch in range(3):
        trained = [(record["keys"], record["views"]) for record in seen if record["epoch"] == epoch]
        assert trained == [(batch.keys, batch.views.tolist()) for batch in epoch_batches(dm, epoch)], epoch
    pids = {tuple(record["worker_pids"]) for record in seen}
    assert len(pids) == 1 and len(next(iter(pids))) == 2 and os.getpid() not in next(iter(pids))


def test_a_forked_worker_reads_the_store_through_its_own_hdf5_handle(tiny):
    """As a DataLoader worker is made: forked after the parent opened the store, the store object inherited as is."""
    store = TeacherStore(tiny["store"])
    parent_handle = store.file
    context = torch.multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_handle_and_keys, args=(store, send))  # fork: args are not pickled
    child.start()
    own_handle, child_keys = receive.recv()
    child.join(timeout=60)
    assert child.exitcode == 0 and own_handle and child_keys == store.keys(0, 3)
    assert store.file is parent_handle and store.keys(0, 3) == child_keys  # the parent's handle stays its own


def _send_handle_and_keys(store: TeacherStore, send) -> None:
    inherited = store._file
    send.send((store.file is not inherited, store.keys(0, 3)))


def test_a_job_warned_of_its_time_limit_saves_its_step_and_submitit_requeues_it_to_continue_there(tiny, tmp_path,
                                                                                                   monkeypatch):
    """SIGUSR2, what SLURM sends (through submitit) before a job's time limit, reaches the training process at step
    2 of 10 (mid-epoch, no periodic checkpoint due): last.ckpt is written at that step, submitit's own handler
    requeues the job (its local executor restarts it, as SLURM would), and the requeued run continues from there
    (resume=auto) to the weights of the uninterrupted run."""
    import submitit

    schedule = ["data.num_workers=0", "callbacks.last_checkpoint.every_n_train_steps=1000"]
    straight, _ = run_stages(distill_cfg(tiny, tmp_path / "straight", *schedule))
    out, marker = tmp_path / "job", tmp_path / "waiting"
    overrides = ["~local", "stages=[distill]", *tiny["overrides"], *schedule, f"distill.out_dir={out}",
                 f"paths.output_dir={out}/logs", "distill.resume=auto", "+callbacks.wait._target_=helpers.WaitAtStep",
                 "+callbacks.wait.step=2", f"+callbacks.wait.marker={marker}"]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(helpers.AppJob(overrides))
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and not job.done():
        time.sleep(0.1)
    assert marker.exists(), job.stderr()
    os.kill(int(marker.read_text()), signal.SIGUSR2)
    marker.with_name(marker.name + ".go").touch()
    results = job.result()

    assert results["distill"]["resumed_from"] == str(out / "student" / "checkpoints" / "last.ckpt")
    assert "SIGUSR2: wrote" in job.stderr() and "Requeued job" in job.stderr() + job.stdout()
    assert results["distill"]["steps"] == straight["distill"]["steps"] == 10
    for root in (tmp_path / "straight", out):
        assert (root / "student.ckpt").is_file()
    a = torch.load(tmp_path / "straight" / "student.ckpt", weights_only=True)["ced_model"]["state_dict"]
    b = torch.load(out / "student.ckpt", weights_only=True)["ced_model"]["state_dict"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_three_ddp_ranks_save_the_same_step_when_one_of_them_is_warned(tiny, tmp_path):
    """SIGUSR2 reaches one of three DDP ranks (whichever reached step 2 first) at step 2: the ranks agree at their
    next check (step 10), all write the one last.ckpt of that step together and stop; none hangs or trains on."""
    from ced_train.lightning.callbacks import SIGNAL_CHECK_STEPS

    out, marker = tmp_path / "distill", tmp_path / "waiting"
    overrides = [o for o in tiny["overrides"] if not o.startswith(("paths.output_dir", "trainer=", "data.batch_size",
                                                                    "distill.trainer."))]
    # 21 clips // (3 ranks x 2) = 3 batches per rank and epoch, 6 epochs: 18 steps, the check at step 10 mid-epoch.
    command = [sys.executable, "-m", "ced_train", "~local", "stages=[distill]", *overrides, "data.batch_size=2",
               "distill.trainer.max_epochs=6", "distill.trainer.check_val_every_n_epoch=6", f"distill.out_dir={out}",
               "callbacks.last_checkpoint.every_n_train_steps=1000", "trainer=cpu", "trainer.devices=3",
               "trainer.strategy=ddp", f"hydra.run.dir={tmp_path}/run", "+callbacks.wait._target_=helpers.WaitAtStep",
               "+callbacks.wait.step=2", f"+callbacks.wait.marker={marker}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), process.communicate(timeout=60)[1][-3000:]
    os.kill(int(marker.read_text()), signal.SIGUSR2)
    marker.with_name(marker.name + ".go").touch()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0 and stderr.count(f"stopped by SIGUSR2 after step {SIGNAL_CHECK_STEPS}") == 3, \
        stderr[-3000:]
    last = torch.load(out / "student" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == SIGNAL_CHECK_STEPS and not (out / "student.ckpt").exists()
