"""`python -m ced_train +recipe=NAME [overrides]`: the Hydra app that runs a recipe's stages in order.

The config lives in `configs/` (recipes in `recipes/`, reachable as the config group `recipe`) at the top of the
repository. Before any stage starts, every file a stage reads must exist or be made by an earlier stage of the same
run, so a run with a missing path fails at once, naming the option that sets it. Each run writes `results.json`
into its run directory, and `results.md` beside it (the mAP table, settings, timings and plots: ced_train/report.py),
and prints `results: <path>` as its last line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ced_train.data.manifest import write_json_atomic
from ced_train.data.remote import RemoteShardError, is_url, local_shards_dir
from ced_train.extras import MissingExtra, require
from ced_train.lightning.fit import StageOutputError
from ced_train.models import CheckpointError
from ced_train.report import write_report
from ced_train.stages import distill, evaluate, is_global_zero, prepare, teach, train
from ced_train.stages.evaluate import systems_of
from ced_train.stages.rank_zero import RankZeroFailed, run_on_rank_zero
from ced_train.store import StoreError

log = logging.getLogger("ced_train")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPE_DIR = CONFIG_DIR / "recipe"

STAGES: dict[str, Callable[[DictConfig], dict]] = {
    "prepare": prepare.run,
    "train": train.run,
    "teach": teach.run,
    "distill": distill.run,
    "evaluate": evaluate.run,
}


# The settings results.md shows, each with the stages that read it (shown when one of them ran).
KEY_SETTINGS: dict[str, tuple[str, ...]] = {
    "seed": ("train", "teach", "distill"),
    "train.model.name": ("train",),
    "train.members": ("train",),
    "teachers.name": ("teach", "distill"),
    "teachers.checkpoints": ("teach",),
    "store.path": ("teach", "distill"),
    "distill.model.name": ("distill",),
    "data.train_shards": ("prepare", "train", "teach", "distill"),
    "data.val_shards": ("train", "distill"),
    "evaluate.shards": ("evaluate",),
    "evaluate.baseline_shards": ("evaluate",),
}


def run_settings(cfg: DictConfig) -> dict:
    """`KEY_SETTINGS` that the run's stages read, resolved (None where unset)."""
    settings = {}
    for key, stages in KEY_SETTINGS.items():
        if set(stages) & set(cfg.stages):
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
            settings[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return settings


class MissingInputError(FileNotFoundError):
    """A file or directory a stage reads neither exists nor is made by an earlier stage of the run."""


def stage_inputs(cfg: DictConfig, stage: str) -> list[tuple[str, Callable[[], object]]]:
    """`(config key, getter)` of every file or directory `stage` reads; getters resolve lazily (they may raise)."""
    if stage == "prepare":
        if cfg.prepare.synthetic is not None:
            return []  # the stage writes its own sources first
        inputs = [(f"prepare.splits.{split}.audio_dir", lambda s=split: cfg.prepare.splits[s].audio_dir)
                  for split in cfg.prepare.splits]
        inputs += [(f"prepare.splits.{split}.segments[{i}]", lambda s=split, i=i: cfg.prepare.splits[s].segments[i])
                   for split in cfg.prepare.splits for i in range(len(cfg.prepare.splits[split].segments))]
        return inputs
    if stage == "train":
        return [("data.train_shards", lambda: cfg.data.train_shards), ("data.val_shards", lambda: cfg.data.val_shards)
                ] + _init_checkpoint_input(cfg, "train")
    if stage == "teach":
        return [("data.train_shards", lambda: cfg.data.train_shards)] + [
            (f"teachers.checkpoints[{i}]", lambda i=i: cfg.teachers.checkpoints[i])
            for i in range(len(cfg.teachers.checkpoints))
        ]
    if stage == "distill":
        return [("data.train_shards", lambda: cfg.data.train_shards), ("data.val_shards", lambda: cfg.data.val_shards),
                ("store.path", lambda: cfg.store.path)] + _init_checkpoint_input(cfg, "distill")
    if stage == "evaluate":
        systems = systems_of(cfg)
        baseline = OmegaConf.to_container(cfg.evaluate, resolve=False).get("baseline_shards") is not None
        return [("evaluate.shards", lambda: cfg.evaluate.shards)] + [
            (f"evaluate.systems.{name}[{i}]", lambda p=path: p)
            for name, paths in systems.items() for i, path in enumerate(paths)
        ] + ([("evaluate.baseline_shards", lambda: cfg.evaluate.baseline_shards)] if baseline else [])
    return []


def _init_checkpoint_input(cfg: DictConfig, stage: str) -> list[tuple[str, Callable[[], object]]]:
    """The `<stage>.init_checkpoint` input, when the stage starts from one (its raw value may interpolate an unset
    path, which is reported like any other)."""
    if OmegaConf.to_container(cfg[stage], resolve=False).get("init_checkpoint") is None:
        return []
    return [(f"{stage}.init_checkpoint", lambda: cfg[stage].init_checkpoint)]


def stage_outputs(cfg: DictConfig, stage: str) -> list[str]:
    """Files and directories `stage` writes (everything below a directory counts as written)."""
    outputs = {
        "prepare": lambda: [split.out for split in cfg.prepare.splits.values()] + [
            split.holdout.out for split in cfg.prepare.splits.values() if split.get("holdout")] + (
            [cfg.prepare.synthetic.out] if cfg.prepare.synthetic is not None else []),
        "train": lambda: [cfg.train.out_dir],
        "teach": lambda: [cfg.store.path],
        "distill": lambda: [cfg.distill.out_dir],
    }
    return [str(path) for path in outputs.get(stage, list)()]


def _unset_path_hints(cfg: DictConfig) -> list[str]:
    """For every `paths.*` that is null: the environment variable that sets it (read from its interpolation)."""
    raw = OmegaConf.to_container(cfg.paths, resolve=False)
    hints = []
    for key, value in raw.items():
        if OmegaConf.select(cfg, f"paths.{key}") is None:
            match = re.search(r"oc\.env:(\w+)", str(value))
            how = f"set the environment variable {match.group(1)}, or " if match else "set "
            hints.append(f"paths.{key} is not set: {how}paths.{key}=... on the command line or in "
                         f"configs/local/default.yaml (`# @package _global_`, then `paths: {{{key}: ...}}`)")
    return hints


def check_inputs(cfg: DictConfig) -> None:
    """Raise MissingInputError listing every input of the run's stages that neither exists nor is made earlier, or,
    for a shard directory at a URL, cannot be fetched and verified (here, so that the stages read the local copy)."""
    made: list[str] = []
    problems: list[str] = []
    for stage in cfg.stages:
        try:
            inputs = stage_inputs(cfg, stage)
        except (OmegaConfBaseException, ValueError) as error:
            problems.append(f"stage {stage}: {error}")
            inputs = []
        for key, get in inputs:
            try:
                path = str(get())
            except OmegaConfBaseException as error:
                problems.append(f"stage {stage} reads {key}, which is not set ({type(error).__name__}: "
                                f"{str(error).splitlines()[0]})")
                continue
            if key.endswith("shards") and is_url(path):  # fetched and verified now, once per process
                try:
                    local_shards_dir(path)
                except RemoteShardError as error:
                    problems.append(f"stage {stage} reads {key}: {error}")
                continue
            if Path(path).exists() or any(path == out or path.startswith(out.rstrip("/") + "/") for out in made):
                continue
            problems.append(f"stage {stage} reads {key} = {path}, which does not exist and no earlier stage of "
                            f"this run makes it")
        made += stage_outputs(cfg, stage)
    if problems:
        hints = [hint for hint in _unset_path_hints(cfg) if any("None" in p for p in problems)]
        raise MissingInputError("missing inputs:\n - " + "\n - ".join(problems + hints))


class StageListError(ValueError):
    """A stage list that cannot run under the configured launch."""


TRAINING_STAGES = ("train", "distill")
def device_count(devices, accelerator: str) -> int:
    """How many devices a Trainer's `devices` names: a count, a list or a comma-separated string of indices; -1 and
    "auto" mean every GPU (one device on a CPU)."""
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("-1", "auto"):
        return 1 if accelerator == "cpu" else max(torch.cuda.device_count(), 1)
    if "," in text:
        return len([index for index in text.split(",") if index.strip()])
    return int(text)


def per_process_batch(global_batch: int, devices, num_nodes: int, accelerator: str) -> int:
    """Resolver `${per_process_batch:GLOBAL,DEVICES,NODES,ACCELERATOR}`: each data-parallel process's share of a
    global batch, so that a recipe keeps the paper's batch (and schedule) on any number of devices."""
    processes = device_count(devices, str(accelerator)) * int(num_nodes)
    if int(global_batch) % processes:
        raise ValueError(f"data.global_batch_size={global_batch} does not split evenly over {processes} processes "
                         f"(trainer.devices={devices} x trainer.num_nodes={num_nodes}): choose a device count that "
                         "divides it, or set data.batch_size yourself")
    return int(global_batch) // processes


OmegaConf.register_new_resolver("per_process_batch", per_process_batch, replace=True)


def lightning_starts_processes(cfg: DictConfig) -> bool:
    """True when the training stages' Trainer will start its own processes by re-running the command line: a DDP
    strategy (or `auto`) over several devices or nodes, in a process that no launcher started (Lightning's own
    children set LOCAL_RANK; torchrun and batch SLURM jobs are detected as Lightning detects them)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    trainer = cfg.trainer
    strategy = str(OmegaConf.to_container(trainer.strategy) if OmegaConf.is_config(trainer.strategy)
                   else trainer.strategy).lower()
    processes = device_count(trainer.devices, str(trainer.accelerator)) * int(trainer.num_nodes)
    ddp_like = ("ddp" in strategy and "spawn" not in strategy) or strategy == "auto"
    launched = "LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect() or SLURMEnvironment.detect()
    return ddp_like and processes > 1 and not launched


def check_stage_list(cfg: DictConfig) -> None:
    """Refuse runs that break when Lightning starts the processes: it re-runs the whole command line in each child
    (a sweep too) and the app from the first training stage on, so a second training stage would start processes again beside running ones,
    and a teacher pass after training would run in every process. Stages before the first training stage run in
    the parent alone (the children find their outputs done); after it, only evaluate (rank 0) may follow."""
    if not lightning_starts_processes(cfg):
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise StageListError(
            f"a -m sweep under trainer.strategy={cfg.trainer.strategy} with trainer.devices={cfg.trainer.devices}: "
            "Lightning starts each job's processes by re-running the command line, which would start the sweep "
            "again in every process; sweep through hydra/launcher=slurm (one task per GPU) or run the jobs one by one")
    stages = list(cfg.stages)
    first = next((i for i, stage in enumerate(stages) if stage in TRAINING_STAGES), None)
    after = [stage for stage in stages[first + 1 :] if stage != "evaluate"] if first is not None else []
    if after:
        raise StageListError(
            f"stages={stages} under trainer.strategy={cfg.trainer.strategy} with trainer.devices={cfg.trainer.devices}: "
            f"only evaluate may follow the training stage {stages[first]} when Lightning starts the processes, "
            f"found {after}; run them as separate runs (e.g. stages=[{stages[first]}] then stages={after}) or start "
            "the processes yourself (torchrun, hydra/launcher=slurm)")


def compose(overrides: list[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The app's config for `overrides` (as on the command line), composed outside a Hydra run (tests, notebooks):
    set `paths.output_dir` (and usually `paths.root_dir`), which otherwise come from the Hydra run."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


class StageError(Exception):
    """A stage refused its settings or inputs (ValueError, OSError, a config or instantiation error): `str()` is one
    line, `stage <name>: <what the stage said>`; the original error is the `__cause__`."""

    def __init__(self, stage: str, error: BaseException) -> None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        if isinstance(error, InstantiationException) and error.__cause__ is not None:
            # Hydra's first line only names the target; the reason is the cause's, the option its `full_key`.
            key = next((line.strip() for line in lines if line.strip().startswith("full_key:")), None)
            lines = str(error.__cause__).strip().splitlines() or [type(error.__cause__).__name__]
            lines[0] += f" ({key})" if key else ""
        super().__init__(f"stage {stage}: {lines[0]}" + (" [...]" if len(lines) > 1 else ""))


# What a stage raises for a setting or input it cannot use (bugs raise other types and keep their tracebacks).
_STAGE_USER_ERRORS = (ValueError, OSError, OmegaConfBaseException, InstantiationException)


def one_process_dir(cfg: DictConfig, stage: str) -> str | None:
    """For a stage that global rank 0 runs for a whole launch (`stages.rank_zero`), a directory beside its outputs;
    None for the others. The teacher pass splits its shards over torchrun's ranks (RANK set: a process group forms),
    but SLURM tasks alone form none."""
    if stage == "prepare":
        return str(cfg.paths.shards_dir)
    if stage == "teach" and "RANK" not in os.environ:
        return str(Path(cfg.store.path).parent)
    return None


def run_stages(cfg: DictConfig) -> tuple[dict, dict]:
    """Check the run's inputs, then run its stages in order → (`{stage: result}`, `{"total"|stage: seconds}`)."""
    unknown = [stage for stage in cfg.stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"stages {unknown} unknown; known stages: {', '.join(STAGES)}")
    check_stage_list(cfg)
    check_inputs(cfg)
    results, seconds = {}, {}
    start = time.perf_counter()
    for stage in cfg.stages:
        log.info("stage %s", stage)
        stage_start = time.perf_counter()
        try:
            beside = one_process_dir(cfg, stage)
            results[stage] = (STAGES[stage](cfg) if beside is None else
                              run_on_rank_zero(stage, STAGES[stage], cfg, beside))
        except (*USER_ERRORS, KeyboardInterrupt):
            raise
        except _STAGE_USER_ERRORS as error:
            raise StageError(stage, error) from error
        seconds[stage] = round(time.perf_counter() - stage_start, 1)
        log.info("stage %s done in %.1f s", stage, seconds[stage])
    return results, {"total": round(time.perf_counter() - start, 1), **seconds}


def usage() -> str:
    recipes = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
    return (
        "No stages to run. Pick a recipe: python -m ced_train +recipe=NAME, e.g. +recipe=tiny_distill (the demo);\n"
        f"recipes: {', '.join(recipes)}. Or name stages yourself: stages=[evaluate] evaluate.checkpoint=PATH."
    )


# StageOutputError: an output of other settings, or an unfinished run's leftovers; the message names the option.
USER_ERRORS = (MissingInputError, StageListError, CheckpointError, StoreError, StageError, StageOutputError,
               RankZeroFailed)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    if not cfg.stages:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    try:
        results, seconds = run_stages(cfg)
    except USER_ERRORS as error:  # the message says what to change; a traceback would only hide it
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        hint = " (HYDRA_FULL_ERROR=1 shows the traceback)" if isinstance(error, StageError) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        sys.exit(2)
    if not is_global_zero():
        return
    run_dir = Path(cfg.paths.output_dir)
    path = run_dir / "results.json"
    payload = {"name": cfg.name, "stages": list(cfg.stages), "run_dir": str(run_dir), "settings": run_settings(cfg),
               "seconds": seconds, "results": results}
    write_json_atomic(path, payload)
    print(f"report: {write_report(payload, run_dir)[0]}", flush=True)
    print(f"results: {path}", flush=True)


def require_launcher_plugin(argv: list[str]) -> None:
    """Raise MissingExtra when the command line picks a launcher of hydra-submitit-launcher (`hydra/launcher=slurm`,
    `slurm_local`, or submitit's own `submitit_slurm`, `submitit_local`) and the `slurm` extra is not installed: Hydra
    itself would only say that it cannot load the config `hydra/launcher/submitit_slurm`, in 8 lines and exit 1."""
    for arg in argv:
        match = re.fullmatch(r"\+{0,2}hydra/launcher=(\w+)", arg)
        if match is None:
            continue
        choice = match[1]
        config = CONFIG_DIR / "hydra" / "launcher" / f"{choice}.yaml"
        defaults = OmegaConf.load(config).get("defaults", []) if config.is_file() else []
        if any(str(name).startswith("submitit_") for name in [choice, *defaults]):
            require("slurm", "hydra_plugins.hydra_submitit_launcher", "submitit", feature=f"hydra/launcher={choice}")


if __name__ == "__main__":
    try:
        require_launcher_plugin(sys.argv[1:])  # before Hydra composes the launcher's config
    except MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
