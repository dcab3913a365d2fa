"""Feeding the training device: every batch type is moved with asynchronous copies wherever the device allows them
(Lightning's own `move_data_to_device` on a `meta` device, which it treats like a GPU), and never to the CPU."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils._python_dispatch import TorchDispatchMode

from ced_train.augment import AugmentConfig, ViewSampler
from ced_train.data import ClipStream, collate_clips, read_manifest
from ced_train.lightning.data import collate_supervised
from ced_train.views import ViewDataset
from helpers import make_shards


class CopyLog(TorchDispatchMode):
    """The `non_blocking` flag of every tensor copy to another device made inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "device" in kwargs:
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("feed") / "shards", [2.0] * 6, samples_per_shard=3)


def supervised_batch(shards):
    sampler = ViewSampler(AugmentConfig(clip_samples=32000, mixup_prob=1.0), seed=0, purpose="train")
    items = list(ViewDataset(shards, sampler=sampler))
    return collate_supervised(items[:4])


def clip_batch(shards):
    manifest = read_manifest(shards)
    clips = list(ClipStream(manifest))[:4]
    return partial(collate_clips, num_classes=manifest.num_classes)(clips)


@pytest.mark.parametrize("make", [supervised_batch, clip_batch], ids=["views", "clips"])
def test_lightning_moves_every_tensor_of_a_batch_asynchronously_to_an_accelerator(shards, make):
    batch = make(shards)
    with CopyLog() as log:
        moved = move_data_to_device(batch, torch.device("meta"))
    tensors = [moved.inputs.waveforms, moved.inputs.clip, moved.labels] if hasattr(moved, "inputs") else [
        moved.waveform, moved.lengths, moved.labels, moved.padding]
    assert all(tensor.device.type == "meta" for tensor in tensors)
    assert len(log.non_blocking) >= len(tensors) and all(log.non_blocking), log.non_blocking


def test_a_batch_is_copied_synchronously_to_the_cpu(shards):
    with CopyLog() as log:
        supervised_batch(shards).inputs.to("cpu")
    assert not any(log.non_blocking)
