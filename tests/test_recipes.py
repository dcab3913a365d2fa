"""The recipes against the real Hydra config: every recipe composes and resolves; each AudioSet recipe puts the
paper's numbers where the stages read them (the Trainer, the optimiser and schedule, the data module's batch, the
teacher pass, the student's registry entry); a run whose paths are missing stops before any stage and names the path
and how to set it; the SLURM launcher composes from the trainer's hardware; and every command in docs/recipes.md,
sweeps expanded, composes."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf

from ced_train.__main__ import CONFIG_DIR, RECIPE_DIR, STAGES, MissingInputError, check_inputs, compose
from ced_train.augment import AugmentConfig
from ced_train.lightning.callbacks import AverageBestCheckpoints
from ced_train.lightning.losses import TopKBCE
from ced_train.models.registry import variant_dims
from ced_train.stages import build_trainer
from ced_train.stages.evaluate import systems_of

REPO = CONFIG_DIR.parent
RECIPES = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
AUDIOSET_RECIPES = [name for name in RECIPES if re.fullmatch(r"audioset_[a-z]+_(balanced|full)", name)]
PAPER_TARGET_RECIPES = [name for name in RECIPES if name.endswith("_paper_targets")]
RECIPES_DOC = REPO / "docs" / "recipes.md"
ENV_VARS = ("AUDIOSET_DIR", "CED_CHECKPOINTS_DIR", "CED_DATA_DIR", "CED_RUNS_DIR", "CED_ROOT", "SLURM_PARTITION",
            "SLURM_ACCOUNT")

# The paper's students (CED_FACTS.md): width, heads, learning rate.
SIZES = {
    "tiny": {"embed_dim": 192, "num_heads": 3, "lr": 1e-3},
    "mini": {"embed_dim": 256, "num_heads": 4, "lr": 1e-3},
    "small": {"embed_dim": 384, "num_heads": 6, "lr": 3e-4},
    "base": {"embed_dim": 768, "num_heads": 12, "lr": 3e-4},
}
# The paper's published training configs per subset. Views: the reference code's comment (120 / 10), see recipes.
SUBSETS = {
    "balanced": {"global_batch": 32, "warmup": 5000, "views": 120, "mixup_prob": 0.5, "data": "audioset_balanced",
                 "train_shards": "audioset/balanced_train"},
    "full": {"global_batch": 128, "warmup": 62500, "views": 10, "mixup_prob": 0.0, "data": "audioset_full",
             "train_shards": "audioset/full_train"},
}
TEACHER_FILES = ["audiotransformer_base_mAP_4999.pt", "audiotransformer_small_mAP_4958.pt"]
# AS-20K as downloaded: about 20,000 clips; its epoch length only scales the balanced recipes' schedule.
AS20K_CLIPS = 20_000


@pytest.fixture
def env(monkeypatch):
    """No path or SLURM variable from the caller's shell leaks into the composed config."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def compose_recipe(recipe: str | None, tmp_path: Path, *overrides: str, hydra: bool = False):
    """The app's config as `python -m ced_train +recipe=RECIPE OVERRIDES` composes it, without the developer's
    git-ignored configs/local (`~local`), with this test's directories."""
    head = [f"+recipe={recipe}"] if recipe else []
    return compose([*head, "~local", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides],
                   return_hydra_config=hydra)


def split(recipe: str) -> tuple[str, str]:
    _, size, subset = recipe.split("_")
    return size, subset


def test_every_recipe_file_is_discovered_and_the_audioset_grid_is_complete():
    assert "tiny_distill" in RECIPES
    assert sorted(AUDIOSET_RECIPES) == sorted(f"audioset_{s}_{d}" for s in SIZES for d in SUBSETS)
    assert sorted(PAPER_TARGET_RECIPES) == sorted(f"{name}_paper_targets" for name in AUDIOSET_RECIPES)


@pytest.mark.parametrize("recipe", PAPER_TARGET_RECIPES)
def test_paper_target_recipe_is_its_audioset_recipe_on_the_imported_store_without_teachers(recipe, tmp_path, env):
    """Everything the student's training reads is the audioset recipe's; only the store (imported, not made by a
    teacher pass) and the teacher systems (none to evaluate) differ."""
    base = recipe.removesuffix("_paper_targets")
    paper, plain = compose_recipe(recipe, tmp_path), compose_recipe(base, tmp_path)
    leaves = dict(_leaves(OmegaConf.to_container(paper, resolve=False)))
    reference = dict(_leaves(OmegaConf.to_container(plain, resolve=False)))
    assert leaves.keys() == reference.keys()
    differing = {"name", "teachers.name", "teachers.checkpoints"}
    if list(plain.stages) != ["distill", "evaluate"]:  # the balanced recipes prepare and teach in the same run
        differing.add("stages")
    assert {key for key in leaves if leaves[key] != reference[key]} == differing
    assert list(paper.stages) == ["distill", "evaluate"] and list(paper.teachers.checkpoints) == []
    assert paper.store.path == f"{tmp_path}/data/store/paper_ensemble5014/{plain.data.name}.h5"
    assert systems_of(paper) == {"student": [f"{paper.distill.out_dir}/student.ckpt"]}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_resolves_completely_with_its_paths_set(recipe, tmp_path, env):
    env.setenv("AUDIOSET_DIR", str(tmp_path / "audioset"))
    env.setenv("CED_CHECKPOINTS_DIR", str(tmp_path / "ced"))
    cfg = compose_recipe(recipe, tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["name"] == recipe
    assert resolved["stages"] and set(resolved["stages"]) <= set(STAGES)
    assert isinstance(instantiate(cfg.augment), AugmentConfig)
    assert callable(instantiate(cfg.distill.loss))


# The AudioSet recipes select checkpoints on the eval set, as the paper's code does (AudioSet has no validation
# split), so that their numbers compare with the paper's: configs/data/audioset_*.yaml.
@pytest.mark.parametrize("recipe", [name for name in RECIPES if not name.startswith("audioset_")])
def test_recipe_reports_on_a_split_other_than_the_one_it_selects_checkpoints_on(recipe, tmp_path, env):
    env.setenv("AUDIOSET_DIR", str(tmp_path / "audioset"))
    env.setenv("CED_CHECKPOINTS_DIR", str(tmp_path / "ced"))
    cfg = compose_recipe(recipe, tmp_path)
    if "evaluate" in cfg.stages and {"train", "distill"} & set(cfg.stages):
        assert cfg.evaluate.shards != cfg.data.val_shards


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.rglob("*.yaml")), ids=lambda p: p.relative_to(RECIPE_DIR).as_posix())
def test_recipe_file_holds_no_machine_path(path):
    values = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
    absolute = [line for line in values if re.search(r"(:|^\s*-)\s*[\"']?(/|~/|[A-Za-z]:\\)", line)]
    assert not absolute, f"{path}: machine paths belong in configs/local or environment variables: {absolute}"


@pytest.mark.parametrize("recipe", AUDIOSET_RECIPES)
def test_audioset_recipe_puts_the_paper_values_where_the_stages_read_them(recipe, tmp_path, env):
    size, subset = split(recipe)
    paper, data = SIZES[size], SUBSETS[subset]
    env.setenv("AUDIOSET_DIR", str(tmp_path / "audioset"))
    env.setenv("CED_CHECKPOINTS_DIR", str(tmp_path / "ced"))
    # The GPU settings are asserted as composed; the Trainer is then built on this CPU with everything else kept.
    cfg = compose_recipe(recipe, tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.num_workers > 0
    cfg = compose_recipe(recipe, tmp_path, "trainer.accelerator=cpu", "logger=csv")

    # Student: the registry entry the stage instantiates (`instantiate(distill.model)` → create_model(name)).
    assert cfg.distill.model.name == f"ced_{size}" and cfg.distill.model.pooling == "logit"
    dims = variant_dims(cfg.distill.model.name)
    assert (dims["embed_dim"], dims["num_heads"], dims["depth"]) == (paper["embed_dim"], paper["num_heads"], 12)

    # Trainer, as stage distill builds it: batch across processes, schedule, validation, early stop, best-4 average.
    trainer = build_trainer(cfg, cfg.distill.trainer, tmp_path / "distill", run_name=recipe)
    assert cfg.data.batch_size * trainer.world_size == data["global_batch"]
    assert trainer.precision == "bf16-mixed"
    if subset == "balanced":
        assert (trainer.max_epochs, trainer.check_val_every_n_epoch) == (300, 5)
        total_steps = trainer.max_epochs * (AS20K_CLIPS // cfg.data.batch_size)
    else:
        assert trainer.world_size == 1  # one GPU at the whole batch (recipes/base/audioset_full.yaml says why)
        assert trainer.max_steps == 300 * 6250 and trainer.max_epochs == -1
        assert trainer.val_check_interval == 3 * 6250 and trainer.check_val_every_n_epoch is None
        total_steps = trainer.max_steps
    assert trainer.early_stopping_callback.patience == 10
    assert trainer.early_stopping_callback.monitor == trainer.checkpoint_callback.monitor == "val/mAP"
    assert trainer.checkpoint_callback.save_top_k >= 4
    assert [cb.num_best for cb in trainer.callbacks if isinstance(cb, AverageBestCheckpoints)] == [4]

    # Optimiser and schedule, as TaggerModule.configure_optimizers binds them: Adam (no decay), warm-up, cosine to 0.1.
    optimizer = instantiate(cfg.distill.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["lr"] == pytest.approx(paper["lr"]) and optimizer.defaults["weight_decay"] == 0.0
    factor = instantiate(cfg.distill.optim.scheduler)(optimizer, total_steps=total_steps).lr_lambdas[0]
    warmup = data["warmup"]
    assert factor(warmup // 2 - 1) == pytest.approx(0.5)
    assert factor(warmup - 1) == pytest.approx(1.0) == factor(warmup)
    assert factor(total_steps - 1) == pytest.approx(0.1)

    # Distillation target and augmentation; teacher pass; data; teachers from CED_CHECKPOINTS_DIR.
    loss = instantiate(cfg.distill.loss)
    assert isinstance(loss, TopKBCE) and loss.fill == "zero" and cfg.distill.views == "replay"
    assert instantiate(cfg.augment).mixup_prob == data["mixup_prob"]
    assert (cfg.teach.views, cfg.teach.top_k) == (data["views"], 20)
    assert cfg.data.name == data["data"]
    assert cfg.data.train_shards == f"{tmp_path}/data/shards/{data['train_shards']}"
    assert cfg.store.path.startswith(f"{tmp_path}/data/store/")
    assert list(cfg.teachers.checkpoints) == [f"{tmp_path}/ced/{name}" for name in TEACHER_FILES]
    assert cfg.teachers._target_ == "ced_train.teachers.load_ensemble" and cfg.teachers.averaging == "probs"
    # The student starts from the MAE checkpoint of its size, as the paper's do.
    assert cfg.distill.init_checkpoint == f"{tmp_path}/ced/audiotransformer_{size}_mae_as_10s.pt"
    segments = [path for source in cfg.prepare.splits.values() for path in source.segments]
    assert segments and all(path.startswith(f"{tmp_path}/audioset/") for path in segments)


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_audioset_recipes_of_one_subset_differ_only_in_student_lr_init_and_name(subset, tmp_path, env):
    def flat(recipe):
        return dict(_leaves(OmegaConf.to_container(compose_recipe(recipe, tmp_path), resolve=False)))

    reference = flat(f"audioset_tiny_{subset}")
    for size in ("mini", "small", "base"):
        other = flat(f"audioset_{size}_{subset}")
        assert other.keys() == reference.keys()
        differing = {key for key in reference if reference[key] != other[key]}
        expected = {"name", "distill.model.name", "distill.init_checkpoint"}
        if SIZES[size]["lr"] != SIZES["tiny"]["lr"]:
            expected.add("distill.optim.optimizer.lr")
        assert differing == expected, size


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def test_command_line_overrides_win_over_an_audioset_recipe(tmp_path, env):
    cfg = compose_recipe("audioset_base_full", tmp_path, "model@distill.model=ced_mini", "data.batch_size=4",
                         "distill.optim.optimizer.lr=5e-4", "teach.views=3", "trainer=cpu", "stages=[distill]")
    assert cfg.distill.model.name == "ced_mini"
    assert (cfg.data.batch_size, cfg.distill.optim.optimizer.lr, cfg.teach.views) == (4, 5e-4, 3)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.strategy == "auto"
    assert list(cfg.stages) == ["distill"]
    assert cfg.distill.optim.scheduler.warmup_steps == 62500  # what was not overridden stays the recipe's


def test_audioset_run_with_missing_paths_stops_before_any_stage_naming_path_and_variable(tmp_path):
    empty = tmp_path / "audioset"
    empty.mkdir()
    environ = {key: value for key, value in os.environ.items() if key not in ENV_VARS}
    environ.update(AUDIOSET_DIR=str(empty), CED_ROOT=str(tmp_path / "root"))
    result = subprocess.run([sys.executable, "-m", "ced_train", "+recipe=audioset_tiny_balanced", "~local"],
                            cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # One error line listing every missing input, not a traceback.
    assert result.stderr.startswith("error: missing inputs:") and "Traceback" not in output
    # A path that is set but empty: the file, and the option it comes from.
    assert f"prepare.splits.balanced_train.audio_dir = {empty}/audio, which does not exist" in output
    assert f"prepare.splits.balanced_train.segments[0] = {empty}/balanced_train_segments.csv" in output
    # A path that is not set at all: the teachers, and the variable that sets their directory.
    assert "teachers.checkpoints[0]" in output and TEACHER_FILES[0] in output
    assert "distill.init_checkpoint" in output and "audiotransformer_tiny_mae_as_10s.pt" in output
    assert "paths.checkpoints_dir is not set: set the environment variable CED_CHECKPOINTS_DIR" in output
    assert "stage prepare" not in output.replace("stage prepare reads", "")  # no stage started
    assert not (tmp_path / "root" / "data").exists()


def test_full_recipe_with_checkpoints_dir_set_names_the_missing_teacher_file_shards_and_store(tmp_path, env):
    env.setenv("CED_CHECKPOINTS_DIR", str(tmp_path / "ced"))
    cfg = compose_recipe("audioset_small_full", tmp_path)
    with pytest.raises(MissingInputError) as error:
        check_inputs(cfg)
    message = str(error.value)
    assert f"{tmp_path}/ced/{TEACHER_FILES[0]}" in message  # evaluate scores the teachers too
    assert f"data.train_shards = {tmp_path}/data/shards/audioset/full_train" in message
    assert "store.path" in message
    assert "CED_CHECKPOINTS_DIR" not in message  # it is set: only what is really missing is named


@pytest.mark.parametrize(("recipe", "nodes", "tasks", "trainer"), [
    ("audioset_tiny_balanced", 1, 1, []), ("audioset_mini_full", 1, 1, []),
    ("audioset_base_full", 2, 8, ["trainer=ddp"])])
def test_slurm_launcher_asks_for_one_task_per_gpu_of_the_recipes_trainer(recipe, nodes, tasks, trainer, tmp_path, env):
    env.setenv("SLURM_PARTITION", "gpu-partition")
    cfg = compose_recipe(recipe, tmp_path, "hydra/launcher=slurm", *trainer, f"trainer.num_nodes={nodes}", hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (nodes, tasks, tasks)
    assert launcher["partition"] == "gpu-partition"
    # A job at its time limit is requeued (submitit, after last.ckpt is written on its signal) and continues.
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] >= 60
    assert cfg.callbacks.last_checkpoint.save_on_signal == "SIGUSR2" and cfg.distill.resume == "auto"
    sweep_dir = cfg.hydra.sweep.dir
    assert sweep_dir.startswith(f"{tmp_path}/runs/{recipe}/multirun/")
    assert launcher["submitit_folder"].startswith(sweep_dir)


def documented_commands() -> list[tuple[dict[str, str], list[str], bool]]:
    """`(environment, overrides, multirun)` of every `python -m ced_train` line in docs/recipes.md's code blocks."""
    commands, in_code, pending = [], False, ""
    for raw in RECIPES_DOC.read_text().splitlines():
        if raw.startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        if raw.rstrip().endswith("\\"):  # a command continued on the next line
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        tokens = shlex.split(line, comments=True)
        if "ced_train" not in tokens:  # other lines, and the other entry points (python -m ced_train.store ...)
            continue
        at = tokens.index("ced_train")
        environment = dict(token.split("=", 1) for token in tokens[:at] if re.fullmatch(r"[A-Z_]+=.*", token))
        overrides, multirun, args = [], False, iter(tokens[at + 1 :])
        for token in args:
            if token in ("-m", "--multirun"):
                multirun = True
            elif token in ("--cfg", "-c", "--package", "-p"):
                next(args)
            elif not token.startswith("-"):
                overrides.append(token)
        commands.append((environment, overrides, multirun))
    return commands


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of `-m OVERRIDES`, expanded by Hydra's own override parser as its basic sweeper does."""
    choices = [[f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(overrides)]
    return [list(job) for job in itertools.product(*choices)]


def test_recipes_doc_shows_a_slurm_sweep():
    sweeps = [(overrides, expand_sweep(overrides)) for _, overrides, multirun in documented_commands() if multirun]
    slurm_sweeps = [jobs for overrides, jobs in sweeps if "hydra/launcher=slurm" in overrides and len(jobs) > 1]
    assert slurm_sweeps, "docs/recipes.md should show a `-m` sweep through hydra/launcher=slurm"


def test_every_command_in_recipes_doc_composes_and_sweeps_set_what_they_sweep(tmp_path, env):
    commands = documented_commands()
    assert len(commands) >= 5
    for environment, overrides, multirun in commands:
        for name, value in environment.items():
            env.setenv(name, value)
        jobs = expand_sweep(overrides) if multirun else [overrides]
        composed = []
        for job in jobs:
            cfg = compose_recipe(None, tmp_path, *job, hydra=multirun)
            OmegaConf.to_container(cfg.hydra.launcher if multirun else cfg.paths, resolve=True)
            for override in OverridesParser.create().parse_overrides(job):
                if override.is_delete() or override.package is not None or "/" in override.key_or_group:
                    continue  # deletions and groups placed at a package or under hydra/ choose files, not values
                value = OmegaConf.select(cfg, override.key_or_group)
                if value is None or isinstance(value, DictConfig) or "${" in override.input_line:
                    continue  # a group's choice (trainer=cpu), a recipe (+recipe=...), or an interpolation
                if isinstance(value, ListConfig):
                    value = OmegaConf.to_container(value)
                assert value == override.value(), f"{' '.join(job)}: {override.key_or_group}"
            composed.append({key: node for key, node in OmegaConf.to_container(cfg, resolve=False).items()
                             if key != "hydra"})
        assert all(a != b for a, b in itertools.combinations(composed, 2)), f"sweep jobs compose alike: {overrides}"
        for name in environment:
            env.delenv(name)


@pytest.mark.parametrize("recipe", ["tiny_distill", "audioset_tiny_full"])
def test_optimiser_settings_are_plain_containers_so_checkpoints_load_safely(recipe, tmp_path, env):
    """AdamW keeps `betas` as given (torch 2.6 stores a ListConfig in the optimiser state, which the safe unpickler
    refuses when the checkpoints are averaged)."""
    cfg = compose_recipe(recipe, tmp_path)
    for stage in ("train", "distill"):
        factory = instantiate(cfg[stage].optim.optimizer)
        assert not any(isinstance(value, (ListConfig, DictConfig)) for value in factory.keywords.values())
        assert factory.keywords["betas"] == [0.9, 0.999]


@pytest.mark.parametrize(("devices", "nodes", "per_process"), [(1, 1, 128), (4, 1, 32), (8, 2, 8)])
def test_the_full_recipes_keep_the_papers_batch_on_any_device_count(devices, nodes, per_process, tmp_path, env):
    env.setenv("AUDIOSET_DIR", str(tmp_path / "audioset"))
    env.setenv("CED_CHECKPOINTS_DIR", str(tmp_path / "ced"))
    cfg = compose_recipe("audioset_tiny_full", tmp_path, "trainer=ddp", f"trainer.devices={devices}",
                         f"trainer.num_nodes={nodes}")
    assert cfg.data.batch_size == per_process and per_process * devices * nodes == 128


def test_a_device_count_that_does_not_split_the_batch_is_refused_naming_the_options(tmp_path, env):
    env.setenv("AUDIOSET_DIR", str(tmp_path / "audioset"))
    cfg = compose_recipe("audioset_tiny_full", tmp_path, "trainer=ddp", "trainer.devices=3")
    with pytest.raises(Exception, match=r"data.global_batch_size=128 does not split evenly over 3 processes"):
        cfg.data.batch_size
