"""Loading CED weights from the official Zenodo files (`{'model': state_dict}`), bare state dicts (with or without
the torchaudio front-end buffers of the official code), the Hugging Face layout (`models/hf.py`) and this project's
Lightning checkpoints.

Files are unpickled with torch's safe loader only (`weights_only=True`, plus the numpy scalar types of `SAFE_GLOBALS`):
a file that needs anything else is refused with one line naming it and the objects it holds, unless the caller
passes `trust=True` (the CLIs' `--trust-checkpoint`, the stages' `trust_checkpoints=true`).

This project's Lightning checkpoints hold the network under the `model.` prefix of `state_dict` and describe it in
`checkpoint["ced_model"] = {"name", "num_classes", "pooling", **build_kwargs}` (`describe_model`; a CNN's `arch`),
optionally with inference weights (averaged or EMA) in `checkpoint["ced_model"]["state_dict"]`. Any registered model
(CED or a timm CNN) loads from such a file; official files and bare state dicts are CED.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ced_train.models.hf import HFLayoutError, hf_directory, hf_labels, read_hf
from ced_train.models.registry import create_model, is_ced, list_models, variant_dims

# Buffers of torchaudio's MelSpectrogram inside the official `front_end` Sequential: recomputed here, so dropped.
_FRONT_END_PREFIX = "front_end."
_LIGHTNING_PREFIX = "model."
# The classification head (LayerNorm + Linear): newly initialised when its shape differs, as in fine-tuning.
_HEAD_PREFIX = "outputlayer."

log = logging.getLogger(__name__)

# Beyond torch's own allow-list: numpy scalars and dtypes, which training scripts store with metrics and settings.
SAFE_GLOBALS = [np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType, np.dtypes.Int64DType,
                np.dtypes.Int32DType, np.dtypes.BoolDType,
                (np._core if hasattr(np, "_core") else np.core).multiarray.scalar]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending keys or tensors."""


def describe_model(model: nn.Module, name: str) -> dict:
    """What a checkpoint records to rebuild `model`, registered as `name`: `{"name", "num_classes", "pooling"}` and
    the model's `build_kwargs` (a CNN's `arch`)."""
    return {"name": name, "num_classes": model.num_classes, "pooling": model.pooling,
            **getattr(model, "build_kwargs", {})}


def read_checkpoint(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read `path` → (network state dict with official names, model description).

    The description holds what the file says about the network (`describe_model`; an HF `config.json`), empty for
    official files and bare state dicts. `trust=True` allows full unpickling (arbitrary code) of a file the safe
    loader refuses.
    """
    directory = hf_directory(path)
    if directory is not None:
        try:
            state_dict, description = read_hf(directory)
        except HFLayoutError as error:
            raise CheckpointError(str(error)) from None
        return state_dict, description
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = _unpickle(path, trust)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(payload).__name__}")
    description = dict(payload.get("ced_model") or {})
    if "state_dict" in description:
        state_dict = description.pop("state_dict")
    elif "state_dict" in payload and isinstance(payload["state_dict"], dict):
        state_dict = {
            key[len(_LIGHTNING_PREFIX) :]: value
            for key, value in payload["state_dict"].items()
            if key.startswith(_LIGHTNING_PREFIX)
        }
        if not state_dict:
            raise CheckpointError(f"{path}: Lightning checkpoint without '{_LIGHTNING_PREFIX}*' tensors")
    elif "model" in payload and isinstance(payload["model"], dict):
        state_dict = payload["model"]
    else:
        state_dict = payload
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise CheckpointError(f"{path}: no state dict found (keys: {sorted(payload)[:10]})")
    return state_dict, description


def _unpickle(path: Path, trust: bool) -> object:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError:
        if trust:
            raise
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        unsafe = sorted(set(unsafe) - {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS})
        held = f"it holds {', '.join(unsafe[:5])}" if unsafe else "it needs full unpickling"
        raise CheckpointError(
            f"{path}: refused: {held}, which loading would execute as code; pass --trust-checkpoint "
            "(stages: trust_checkpoints=true) only for a file from a source you trust") from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None


def checkpoint_class_names(path: str | Path) -> list[str] | None:
    """The display names a checkpoint carries (an HF layout's `id2label`), or None."""
    directory = hf_directory(path)
    if directory is None:
        return None
    try:
        return hf_labels(directory)
    except HFLayoutError as error:
        raise CheckpointError(str(error)) from None


def infer_model_name(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> str:
    """The registered variant whose width and depth match the tensors of `state_dict`."""
    try:
        embed_dim = state_dict["patch_embed.proj.weight"].shape[0]
    except KeyError:
        raise CheckpointError(f"{source}: no 'patch_embed.proj.weight': not a CED checkpoint") from None
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    for name in filter(is_ced, list_models()):
        dims = variant_dims(name)
        if (dims["embed_dim"], dims["depth"]) == (embed_dim, depth):
            return name
    raise CheckpointError(f"{source}: no registered variant has embed_dim={embed_dim}, depth={depth}")


def resize_pos_embed(table: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resize a positional table along `dim` (-1 time, -2 frequency) as the official code does: truncate when the
    target is shorter, bilinear interpolation (align_corners=False) when it is longer."""
    if table.shape[dim] >= size:
        return table.narrow(dim, 0, size)
    target = (1, size) if dim == -1 else (size, 1)
    return nn.functional.interpolate(table, size=target, mode="bilinear", align_corners=False)


def _resize_pos_tables(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the official front-end buffers, its positional tables resized to the model's."""
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(_FRONT_END_PREFIX)}
    for name, dim in (("time_pos_embed", -1), ("freq_pos_embed", -2)):
        if name in state_dict and name in own and state_dict[name].ndim == 4:
            state_dict[name] = resize_pos_embed(state_dict[name], own[name].shape[dim], dim)
    return state_dict


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    """Load `state_dict` (official names) into `model` strictly, resizing positional tables of another length.

    Raises:
        CheckpointError: listing missing and unexpected keys, or naming a tensor whose shape differs.
    """
    own = model.state_dict()
    state_dict = _resize_pos_tables(state_dict, own)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match the model: missing {len(missing)} keys {missing}, "
            f"unexpected {len(unexpected)} keys {unexpected}"
        )
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True)
    return model


def load_checkpoint(path: str | Path, model_name: str | None = None, trust: bool = False,
                    **model_kwargs) -> nn.Module:
    """Build and load a model from a checkpoint, in eval mode.

    Args:
        path: official `.pt`, bare state dict, HF-layout directory (or its weights file), or an export or Lightning
            `.ckpt` of this project (any registered model, as the file describes it).
        trust: allow full unpickling of a file the safe loader refuses (`read_checkpoint`).
        model_name: registered variant; from the file's description, else inferred from a CED state dict.
        model_kwargs: overrides such as `pooling`; `num_classes` defaults to the head in the file.
    """
    state_dict, description = read_checkpoint(path, trust)
    name = model_name or description.pop("name", None) or infer_model_name(state_dict, str(path))
    head = state_dict.get("outputlayer.1.weight")
    description.pop("num_classes", None)
    kwargs = {**description, "pooling": description.get("pooling", "mean")}
    if head is not None:
        kwargs["num_classes"] = head.shape[0]
    try:
        model = create_model(name, **{**kwargs, **model_kwargs})
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build the model it describes ({error})") from None
    return load_weights(model, state_dict, str(path)).eval()


@dataclass(frozen=True)
class InitSummary:
    """What `init_from_checkpoint` did, by tensor name: copied from the file, left at the model's own
    initialisation, or present in the file but not used (an MAE decoder, mask tokens, front-end buffers)."""

    source: str
    loaded: tuple[str, ...]
    new: tuple[str, ...]
    skipped: tuple[str, ...]

    @property
    def head_loaded(self) -> bool:
        return any(key.startswith(_HEAD_PREFIX) for key in self.loaded) and not any(
            key.startswith(_HEAD_PREFIX) for key in self.new)

    def __str__(self) -> str:
        def names(keys: tuple[str, ...]) -> str:
            return ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        return (f"init from {self.source}: loaded {len(self.loaded)} tensors; new {len(self.new)} [{names(self.new)}]; "
                f"skipped {len(self.skipped)} [{names(self.skipped)}]")


def init_from_checkpoint(model: nn.Module, path: str | Path, trust: bool = False) -> InitSummary:
    """Initialise `model` from any checkpoint `read_checkpoint` reads (official, MAE, bare, this project's).

    Backbone tensors are matched by name and must agree in shape (positional tables are resized as the official
    code does); the head is kept newly initialised when its shape differs (other classes); tensors the model does not
    have are skipped. Unlike `load_weights`, tensors the file lacks keep the model's initialisation.

    Raises:
        CheckpointError: a backbone tensor of another shape (another model size), or no backbone tensor matched.
    """
    state_dict, _ = read_checkpoint(path, trust)
    source = str(path)
    own = model.state_dict()
    skipped = sorted(key for key in state_dict if key.startswith(_FRONT_END_PREFIX) or key not in own)
    state_dict = {key: value for key, value in _resize_pos_tables(state_dict, own).items() if key in own}
    loaded, new = {}, []
    head_matches = all(state_dict.get(key) is not None and state_dict[key].shape == value.shape
                       for key, value in own.items() if key.startswith(_HEAD_PREFIX))
    for key, value in own.items():
        if key not in state_dict or (key.startswith(_HEAD_PREFIX) and not head_matches):
            new.append(key)
        elif state_dict[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: backbone tensor {key!r} has shape {tuple(state_dict[key].shape)}, the model expects "
                f"{tuple(value.shape)} (a checkpoint of another model size?)")
        else:
            loaded[key] = state_dict[key]
    skipped += sorted(key for key in state_dict if key.startswith(_HEAD_PREFIX) and key in new)
    if not any(not key.startswith(_HEAD_PREFIX) for key in loaded):
        raise CheckpointError(f"{source}: no tensor matches the model's backbone by name: not a CED checkpoint?")
    model.load_state_dict(loaded, strict=False)
    summary = InitSummary(source, tuple(sorted(loaded)), tuple(sorted(new)), tuple(sorted(skipped)))
    log.info("%s", summary)
    return summary
