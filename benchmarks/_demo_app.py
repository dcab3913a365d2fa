"""What the benchmarks that train on the demo's outputs share: the recipe's composed config, a check that the demo
(`make demo`) has run, and one run of the real app in a subprocess. Not a benchmark itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ced_train.__main__ import compose


def recipe_config(recipe: str, root: Path, overrides: list[str]):
    return compose([f"+recipe={recipe}", f"paths.root_dir={root}", f"paths.output_dir={root}/unused", *overrides])


def missing_inputs(cfg) -> list[str]:
    """The demo's outputs a benchmark reads (shards, teachers) that are not there."""
    shards = [Path(cfg.data.train_shards), Path(cfg.data.val_shards), Path(cfg.evaluate.shards)]
    missing = [str(path / "manifest.json") for path in shards if not (path / "manifest.json").is_file()]
    return missing + [path for path in cfg.teachers.checkpoints if not Path(path).is_file()]


def require_demo(cfg, root: Path, benchmark: str) -> None:
    """Exit 2 with one line when the demo's shards or teachers are missing under `root`."""
    missing = missing_inputs(cfg)
    if missing:
        print(f"{benchmark} needs the tiny_distill demo's shards and teachers under {root} (missing "
              f"{missing[0]}{' and more' if len(missing) > 1 else ''}): run `make demo` first", file=sys.stderr)
        sys.exit(2)


def run_app(recipe: str, root: Path, overrides: list[str], run_dir: Path) -> dict:
    """`python -m ced_train +recipe=RECIPE OVERRIDES` with its run directory at `run_dir` → its results.json; the
    output goes to `run_dir/app.log`, and a failed run ends the benchmark with that log's tail."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "ced_train", f"+recipe={recipe}", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "CED_ROOT": str(root), "WANDB_SILENT": "true"}
    with open(run_dir / "app.log", "w") as log:
        result = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (run_dir / "app.log").read_text().splitlines()[-30:]
        sys.exit(f"{' '.join(command)} failed (exit {result.returncode}):\n" + "\n".join(tail))
    return json.loads((run_dir / "results.json").read_text())
