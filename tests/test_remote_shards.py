"""Shard directories at URLs (ced_train/data/remote.py): served over HTTP on the loopback, as `file://` and through
a `pipe:` command, they read the same clips, labels and fingerprint as the local directory; the cache fetches each
file once, also for three processes at once, and keeps no unverified byte; a tampered, missing or unreachable shard
is one line naming its URL; the teacher pass, replay and the app's evaluate stage run on them."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ced_train.augment import AugmentConfig
from ced_train.data import ClipStream, iter_shard, read_manifest
from ced_train.data.remote import RemoteShardError, shards_cache_path
from ced_train.models import create_model
from ced_train.rendering import ViewRenderer
from ced_train.stages.teach import teacher_pass
from ced_train import store as store_module
from ced_train.store import StoreError
from ced_train.teachers import TeacherEnsemble
from ced_train.views import ViewDataset, collate_items
from helpers import HashTeacher, app_env, make_shards

REPO = Path(__file__).resolve().parents[1]
AUGMENT = AugmentConfig(clip_samples=16000, time_mask_max_frames=20)  # 1 s chunks


class Server:
    """`http.server` on 127.0.0.1 serving `root`, recording every requested path; `.tar` answers wait `delay_s`."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.delay_s = root, [], 0.0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path.endswith(".tar"):
                    time.sleep(server.delay_s)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def serve(self, shards: Path, name: str) -> Path:
        """A copy of the shard directory `shards` served as `/<name>`."""
        return Path(shutil.copytree(shards, self.root / name))

    def fetched(self, name: str) -> list[str]:
        return sorted(path.removeprefix(f"/{name}/") for path in self.requests if path.startswith(f"/{name}/"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """7 labelled clips of 1 to 2 s in 3 shards."""
    return make_shards(tmp_path_factory.mktemp("remote") / "train", [1.0, 2.0, 1.5, 1.0, 1.2, 2.0, 1.0],
                       samples_per_shard=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("served"))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own (a process resolves a URL once per cache directory)."""
    monkeypatch.setenv("CED_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shard_names(shards: Path) -> list[str]:
    return [shard.name for shard in read_manifest(shards).shards]


def clips_of(manifest) -> list[tuple]:
    """Every clip as read by the shard reader and by a shuffled ClipStream: key, labels, meta, waveform bytes."""
    read = [(c.key, c.labels, c.meta, c.waveform.tobytes()) for s in manifest.shards for c in iter_shard(s.path)]
    stream = ClipStream(manifest, shuffle_shards=True, shuffle_buffer=4, seed=3)
    stream.set_epoch(1)
    return read + [(c.key, c.labels, c.meta, c.waveform.numpy().tobytes()) for c in stream]


def url_of(kind: str, server: Server, served: Path) -> str:
    return {"http": server.url(served.name), "file": f"file://{served}",
            "pipe": f"pipe:cat {served}/{{}}"}[kind]


@pytest.mark.parametrize("kind", ["http", "file", "pipe"])
def test_shards_at_a_url_read_the_clips_labels_and_fingerprint_of_the_local_directory_bit_for_bit(
        kind, shards, server, cache):
    url = url_of(kind, server, server.serve(shards, f"same_{kind}"))
    local, remote = read_manifest(shards), read_manifest(url)
    assert remote.root.parent.parent == cache  # <cache>/shards/<tail>-<hash>
    assert remote.fingerprint == local.fingerprint
    assert (remote.class_mids, remote.num_samples) == (local.class_mids, local.num_samples)
    assert [(s.name, s.keys, s.sha256) for s in remote.shards] == [(s.name, s.keys, s.sha256) for s in local.shards]
    assert clips_of(remote) == clips_of(local)
    assert (remote.root / "skipped.tsv").read_bytes() == (shards / "skipped.tsv").read_bytes()


def test_a_url_is_fetched_once_per_process_and_later_processes_fetch_only_its_manifest(shards, server, cache):
    url = server.url(server.serve(shards, "once").name)
    read_manifest(url)
    assert server.fetched("once") == sorted(["manifest.json", "skipped.tsv", *shard_names(shards)])
    read_manifest(url)  # the same process: nothing
    assert len(server.fetched("once")) == 2 + len(shard_names(shards))
    env = {**app_env(cache), "CED_CACHE_DIR": str(cache)}
    again = subprocess.run([sys.executable, "-c", f"from ced_train.data import read_manifest; read_manifest({url!r})"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 0, again.stderr
    assert server.fetched("once") == sorted(["manifest.json", "manifest.json", "skipped.tsv", *shard_names(shards)])
    assert f"all 3 shards cached in {cache}" in again.stderr


RESOLVE = """
import sys, time
from pathlib import Path
from ced_train.data import read_manifest
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
print(read_manifest(sys.argv[1]).root, read_manifest(sys.argv[1]).fingerprint)
"""


def test_three_processes_resolving_one_url_at_once_fetch_each_shard_once_and_agree(shards, server, cache,
                                                                                   tmp_path):
    url = server.url(server.serve(shards, "together").name)
    server.delay_s = 1.0  # the first process holds the lock while the others arrive
    go = tmp_path / "go"
    try:
        env = {**app_env(cache), "CED_CACHE_DIR": str(cache)}
        processes = [subprocess.Popen([sys.executable, "-c", RESOLVE, url, str(tmp_path / f"ready{i}"), str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for i in range(3)]
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        server.delay_s = 0.0
    assert [process.returncode for process in processes] == [0, 0, 0], [err for _, err in outputs]
    root = shards_cache_path(url)
    assert {out for out, _ in outputs} == {f"{root} {read_manifest(shards).fingerprint}\n"}
    assert sum("waiting for another process" in err for _, err in outputs) >= 1  # they did meet at the lock
    assert server.fetched("together") == sorted(["manifest.json"] * 3 + ["skipped.tsv", *shard_names(shards)])
    assert sorted(path.name for path in root.iterdir()) == sorted([".lock", "manifest.json", "skipped.tsv",
                                                                    *shard_names(shards)])
    for name in shard_names(shards):
        assert (root / name).read_bytes() == (shards / name).read_bytes()


def test_a_tampered_shard_is_refused_in_one_line_naming_it_and_a_repaired_one_is_all_that_is_fetched_again(
        shards, server, cache):
    served = server.serve(shards, "tampered")
    name = shard_names(shards)[1]
    data = bytearray((served / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    (served / name).write_bytes(bytes(data))
    url = server.url("tampered")
    with pytest.raises(RemoteShardError) as caught:
        read_manifest(url)
    message = str(caught.value)
    expected = next(s.sha256 for s in read_manifest(shards).shards if s.name == name)
    assert "\n" not in message and message.startswith(f"{url}/{name}: manifest.json lists "), message
    assert expected in message and hashlib.sha256(bytes(data)).hexdigest() in message
    root = next((cache / "shards").iterdir())
    kept = sorted(path.name for path in root.iterdir() if path.name.endswith(".tar"))  # fetched before it failed
    assert name not in kept and not (root / "manifest.json").exists()
    assert not [path for path in root.iterdir() if ".partial" in path.name]
    assert all((root / kept_name).read_bytes() == (shards / kept_name).read_bytes() for kept_name in kept)

    shutil.copyfile(shards / name, served / name)
    server.requests.clear()
    assert read_manifest(url).fingerprint == read_manifest(shards).fingerprint
    again = sorted(set(shard_names(shards)) - set(kept))  # the verified ones are kept
    assert server.fetched("tampered") == sorted(["manifest.json", "skipped.tsv", *again])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_missing_shard_an_unreachable_host_and_a_failing_pipe_are_one_line_each(shards, server, tmp_path):
    served = server.serve(shards, "missing")
    name = shard_names(shards)[2]
    (served / name).unlink()
    refused = f"http://127.0.0.1:{free_port()}/train"
    cases = {
        server.url("missing"): f"{server.url('missing')}/{name}: not found",
        refused: f"{refused}/manifest.json: ClientConnectorError: Cannot connect to host",
        f"pipe:cat {tmp_path}/nowhere/{{}}": f"pipe:cat {tmp_path}/nowhere/manifest.json: exit status 1: cat: ",
        f"pipe:cat {served}/manifest.json": "needs {} where the file name goes",
        "nosuchscheme://bucket/train": "nosuchscheme://bucket/train/manifest.json: ValueError: Protocol not known",
    }
    for url, start in cases.items():
        with pytest.raises(RemoteShardError) as caught:
            read_manifest(url)
        assert "\n" not in str(caught.value) and start in str(caught.value), (url, str(caught.value))


def test_a_missing_fsspec_plugin_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # not installed, whether or not this machine has it
    with pytest.raises(RemoteShardError, match=r"^s3://bucket/train/manifest.json: ImportError: Install s3fs"):
        read_manifest("s3://bucket/train")


def read_store(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {name: file[name][...] for name in store_module.DATASETS}


def test_the_teacher_pass_writes_the_same_store_from_a_url_and_replay_on_it_renders_what_the_teachers_saw(
        shards, server, tmp_path):
    url = server.url(server.serve(shards, "teach").name)
    ensemble = TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}])
    run = dict(ensemble=ensemble, augment=AUGMENT, seed=0, num_views=2, batch_size=4, progress=False)
    teacher_pass(shards, tmp_path / "local.h5", **run)
    teacher_pass(url, tmp_path / "remote.h5", **run)
    local, remote = read_store(tmp_path / "local.h5"), read_store(tmp_path / "remote.h5")
    assert all(np.array_equal(local[name], remote[name]) for name in store_module.DATASETS)

    dataset = ViewDataset(url, store=tmp_path / "local.h5")  # a store made from the local copy replays on the URL
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_items):
            _, replayed = HashTeacher()(ViewRenderer()(batch["inputs"])).topk(20)
            assert torch.equal(replayed, batch["topk_indices"]), batch["key"]

    other = make_shards(tmp_path / "other", [1.0] * 3, samples_per_shard=3, seed=1)
    with pytest.raises(StoreError, match=f"fingerprint {read_manifest(shards).fingerprint}.*"
                                         f"has {read_manifest(other).fingerprint}"):
        ViewDataset(server.url(server.serve(other, "other").name), store=tmp_path / "local.h5")


def app(root: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ced_train", "~local", f"paths.root_dir={root}",
                           f"hydra.run.dir={root}/run", "logger=none", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**app_env(root), "CED_CACHE_DIR": str(cache)})


def test_the_app_evaluates_shards_at_urls_and_names_the_option_of_one_it_cannot_reach(shards, server, tmp_path,
                                                                                         cache):
    served = server.serve(shards, "evaluate")
    checkpoint = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save({"model": create_model("ced_test").state_dict()}, checkpoint)
    url, pipe = server.url(served.name), f"pipe:cat {served}/{{}}"
    result = app(tmp_path, cache, "stages=[evaluate]", f"evaluate.shards={url}", f"evaluate.checkpoint={checkpoint}",
                 f"evaluate.baseline_shards='{pipe}'", "evaluate.num_workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(Path(result.stdout.strip().splitlines()[-1].removeprefix("results: ")).read_text())
    evaluated = results["results"]["evaluate"]
    fingerprint = read_manifest(shards).fingerprint
    assert (evaluated["shards"], evaluated["shards_fingerprint"]) == (url, fingerprint)
    assert evaluated["systems"]["model"]["num_clips"] == 7
    fitted_on = evaluated["systems"]["baseline_logreg"]["fitted_on"]
    assert (fitted_on["shards"], fitted_on["shards_fingerprint"], fitted_on["clips"]) == (pipe, fingerprint, 7)
    assert f"shards {url}: fetched and verified 3 of 3 shards" in result.stderr

    refused = f"http://127.0.0.1:{free_port()}/eval"
    failed = app(tmp_path, cache, "stages=[evaluate]", f"evaluate.shards={refused}",
                 f"evaluate.checkpoint={checkpoint}", "evaluate.baseline_shards=null")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"stage evaluate reads evaluate.shards: {refused}/manifest.json: ClientConnectorError" in failed.stderr
