"""The Hydra app: every recipe composes and instantiates its parts, AudioSet recipes name missing paths before any
stage runs, and a bare `python -m ced_train` explains itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ced_train.__main__ import (
    CONFIG_DIR,
    RECIPE_DIR,
    STAGES,
    MissingInputError,
    check_inputs,
    compose,
    lightning_starts_processes,
)

REPO = CONFIG_DIR.parent
RECIPES = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
AUDIOSET_RECIPES = [name for name in RECIPES if name.startswith("audioset_")]


@pytest.fixture
def no_audioset_env(monkeypatch):
    for name in ("AUDIOSET_DIR", "CED_CHECKPOINTS_DIR", "CED_DATA_DIR", "CED_RUNS_DIR", "CED_ROOT"):
        monkeypatch.delenv(name, raising=False)


def test_recipes_dir_holds_the_demo_and_eight_audioset_recipes_each_also_on_the_paper_targets():
    assert "tiny_distill" in RECIPES
    sizes = ("tiny", "mini", "small", "base")
    grid = [f"audioset_{s}_{d}" for s in sizes for d in ("balanced", "full")]
    assert sorted(AUDIOSET_RECIPES) == sorted(grid + [f"{name}_paper_targets" for name in grid])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_its_parts_instantiate(recipe, tmp_path, no_audioset_env):
    cfg = compose(["~local", f"+recipe={recipe}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"])
    assert cfg.name == recipe
    assert cfg.stages and set(cfg.stages) <= set(STAGES)
    # Resolving everything but the paths a missing environment leaves null must work.
    OmegaConf.to_container(cfg.distill, resolve=True)
    OmegaConf.to_container(cfg.evaluate, resolve=True)
    loss = instantiate(cfg.distill.loss)
    optimizer = instantiate(cfg.distill.optim.optimizer)
    assert callable(loss) and callable(optimizer)
    assert cfg.callbacks.model_checkpoint.monitor == "val/mAP" == cfg.callbacks.early_stopping.monitor
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.parametrize("recipe", ["audioset_tiny_balanced", "audioset_base_full"])
def test_audioset_recipe_without_paths_fails_naming_options_and_env_vars(recipe, tmp_path, no_audioset_env):
    cfg = compose(["~local", f"+recipe={recipe}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"])
    with pytest.raises(MissingInputError) as error:
        check_inputs(cfg)
    message = str(error.value)
    assert "CED_CHECKPOINTS_DIR" in message and "paths.checkpoints_dir" in message
    assert "audiotransformer_base_mAP_4999.pt" in message  # the teachers, read by teach or evaluate
    if "prepare" in cfg.stages:
        assert "AUDIOSET_DIR" in message and "prepare.splits.balanced_train.audio_dir" in message
    else:  # shards are prepared by a separate run: the error says which directory is missing
        assert "data.train_shards" in message and "store.path" in message


def test_audioset_recipe_with_paths_set_names_only_what_is_still_missing(tmp_path, monkeypatch):
    audioset, checkpoints = tmp_path / "audioset", tmp_path / "ced"
    (audioset / "audio").mkdir(parents=True)
    (audioset / "balanced_train_segments.csv").write_text("#\n")
    (audioset / "eval_segments.csv").write_text("#\n")
    checkpoints.mkdir()
    monkeypatch.setenv("AUDIOSET_DIR", str(audioset))
    monkeypatch.setenv("CED_CHECKPOINTS_DIR", str(checkpoints))
    cfg = compose(["~local", "+recipe=audioset_tiny_balanced", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/r"])
    with pytest.raises(MissingInputError) as error:
        check_inputs(cfg)
    message = str(error.value)
    assert "audiotransformer_base_mAP_4999.pt" in message
    assert "AUDIOSET_DIR" not in message and "audio_dir" not in message  # present now
    assert "data.train_shards" not in message  # made by the run's own prepare stage


def test_unknown_recipe_lists_the_available_ones(tmp_path):
    with pytest.raises(Exception, match="tiny_distill"):
        compose(["~local", "+recipe=no_such_recipe", f"paths.root_dir={tmp_path}"])


def test_command_line_override_beats_recipe(tmp_path):
    cfg = compose(["~local", "+recipe=tiny_distill", "distill.views=fresh", "model@distill.model=ced_mini",
                   f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    assert cfg.distill.views == "fresh"
    assert cfg.distill.model.name == "ced_mini"
    assert cfg.train.model.name == "mobilenetv3_small"  # the recipe's teachers are untouched


def test_bare_command_explains_how_to_pick_a_recipe(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ced_train", "~local", f"paths.root_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CED_ROOT": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "+recipe=tiny_distill" in result.stderr
    assert "audioset_tiny_balanced" in result.stderr
    assert not (Path(tmp_path) / "data").exists()


def test_slurm_launcher_asks_for_one_task_per_gpu_on_every_node(tmp_path):
    cfg = compose(["~local", "+recipe=audioset_small_full", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                   f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/runs/audioset_small_full/multirun/")


def app(tmp_path, *overrides, flags=()):
    env = {key: value for key, value in os.environ.items()
           if key not in ("AUDIOSET_DIR", "CED_CHECKPOINTS_DIR", "CED_DATA_DIR", "CED_RUNS_DIR", "LOCAL_RANK", "RANK")}
    return subprocess.run([sys.executable, "-m", "ced_train", *flags, "~local", f"paths.root_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path}/run", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**env, "CED_ROOT": str(tmp_path)})


def test_a_second_training_stage_under_lightning_started_ddp_is_refused_in_one_line_before_anything_runs(tmp_path):
    result = app(tmp_path, "stages=[teach,train,distill,evaluate]", "trainer=cpu", "trainer.devices=3",
                 "trainer.strategy=ddp")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "only evaluate may follow the training stage train" in line and "['distill']" in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "results.json").exists()


def test_missing_inputs_are_reported_without_a_traceback(tmp_path):
    result = app(tmp_path, "+recipe=audioset_tiny_full")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: missing inputs:")
    assert "paths.checkpoints_dir is not set" in result.stderr


def test_a_sweep_whose_jobs_lightning_would_relaunch_is_refused_in_one_line(tmp_path):
    result = app(tmp_path, "stages=[evaluate]", "evaluate.checkpoint=x.pt", "trainer=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep", flags=["-m"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: a -m sweep under trainer.strategy=ddp with trainer.devices=2" in result.stderr


@pytest.mark.parametrize("overrides, starts", [
    (["trainer=cpu", "trainer.devices=3", "trainer.strategy=ddp"], True),
    (["trainer=cpu", "trainer.devices=[0,1]", "trainer.strategy=ddp"], True),
    (["trainer=cpu", "trainer.devices='0,1'", "trainer.strategy=ddp"], True),
    (["trainer=cpu", "trainer.devices=2"], True),  # strategy auto picks DDP and re-runs the command line
    (["trainer=cpu", "trainer.devices=[1]", "trainer.strategy=ddp"], False),
    (["trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"], False),
    (["trainer=cpu", "trainer.devices=auto", "trainer.strategy=ddp"], False),  # one CPU device
    (["trainer=cpu", "trainer.num_nodes=2", "trainer.strategy=ddp"], True),
    (["trainer=cpu"], False),
])
def test_lightning_started_processes_are_recognised_from_any_devices_spelling(overrides, starts, tmp_path,
                                                                            monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    cfg = compose(["~local", *overrides, f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"])
    assert lightning_starts_processes(cfg) is starts
    monkeypatch.setenv("LOCAL_RANK", "1")  # one of Lightning's own children
    assert lightning_starts_processes(cfg) is False


def test_an_error_inside_a_stage_is_one_line_naming_the_option_unless_hydra_full_error(tmp_path):
    from helpers import make_shards

    shards = make_shards(tmp_path / "eval", [1.0, 1.0], samples_per_shard=2)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    overrides = ["stages=[evaluate]", f"evaluate.shards={shards}", f"evaluate.checkpoint={checkpoint}",
                 "evaluate.baseline_shards=null", "evaluate.precision=fp13", "logger=none"]
    result = app(tmp_path, *overrides)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: stage evaluate: evaluate.precision='fp13': expected auto or one of")
    assert "HYDRA_FULL_ERROR=1" in line
    full = subprocess.run([sys.executable, "-m", "ced_train", "~local", f"paths.root_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path}/run2", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CED_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "evaluate.precision='fp13'" in full.stderr
