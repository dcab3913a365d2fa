"""The Hugging Face layout of the released CED models (`mispeech/ced-{tiny,mini,small,base}`): a directory holding
`config.json` (the fields of the official `CedConfig`) and `model.safetensors` (some revisions `pytorch_model.bin`).

Tensor names, HF ↔ official (the names `CEDModel` uses): `encoder.init_bn.<p>` ↔ `init_bn.1.<p>`, `outputlayer.<p>`
↔ `outputlayer.<p>` (unprefixed in both), every other `encoder.<k>` ↔ `<k>`. The official `front_end.*` buffers have
no HF counterpart (the HF front end is the feature extractor). Nothing here touches the network: the official config
code fetches a label file when `outputdim == 527`; the names here come from `id2label` or a local label file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
WEIGHT_NAMES = (SAFETENSORS_NAME, "pytorch_model.bin")

_ENCODER = "encoder."
_HF_BN = "encoder.init_bn."
_OFFICIAL_BN = "init_bn.1."
_HEAD = "outputlayer."
_FRONT_END = "front_end."
# `CedConfig(name=...)` sets embed_dim and num_heads from the name, whatever the other fields say.
_PRESETS = {"ced-tiny": (192, 3), "ced-mini": (256, 4), "ced-small": (384, 6), "ced-base": (768, 12)}
# The front end and inference settings `CEDModel` implements, as CedConfig spells them (f_max null = 8000 Hz).
_FIXED = {"n_mels": 64, "n_fft": 512, "hop_size": 160, "win_size": 512, "f_min": 0, "f_max": 8000, "center": True,
          "pooling": "mean", "eval_avg": "mean", "qkv_bias": True, "pad_last": True}


class HFLayoutError(ValueError):
    """An HF-layout directory that cannot be read; the message names the file and the field."""


def hf_directory(path: str | Path) -> Path | None:
    """The HF-layout directory `path` names (the directory, or its weights file beside a `config.json`), else None."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path
    if path.name in WEIGHT_NAMES and (path.parent / CONFIG_NAME).is_file():
        return path.parent
    return None


def hf_files(directory: Path) -> list[Path]:
    """`[config.json, weights file]` of an HF-layout directory (safetensors preferred)."""
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return [directory / CONFIG_NAME, directory / name]
    raise HFLayoutError(f"{directory}: {CONFIG_NAME} without {' or '.join(WEIGHT_NAMES)}")


def hf_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names → official names (module docstring); a name outside the mapping raises HFLayoutError."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_HF_BN):
            out[_OFFICIAL_BN + key[len(_HF_BN):]] = value
        elif key.startswith(_HEAD):
            out[key] = value
        elif key.startswith(_ENCODER):
            out[key[len(_ENCODER):]] = value
        else:
            raise HFLayoutError(f"tensor {key!r} is neither 'encoder.*' nor 'outputlayer.*': not a CED HF checkpoint")
    return out


def official_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official tensor names → HF names; the official front-end buffers are dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_FRONT_END):
            continue
        if key.startswith(_OFFICIAL_BN):
            out[_HF_BN + key[len(_OFFICIAL_BN):]] = value
        elif key.startswith(_HEAD):
            out[key] = value
        else:
            out[_ENCODER + key] = value
    return out


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HFLayoutError(f"{path}: not a readable JSON config ({error})") from None
    if not isinstance(config, dict):
        raise HFLayoutError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _check_fixed(config: dict, path: Path) -> None:
    for field, expected in _FIXED.items():
        value = config.get(field, expected)
        if field == "f_max" and value is None:
            value = 8000
        if value != expected:
            raise HFLayoutError(f"{path}: {field}={value!r} is not supported (ced-train's CED implements "
                                f"{field}={expected!r})")
    if config.get("patch_stride", config.get("patch_size", 16)) != config.get("patch_size", 16):
        raise HFLayoutError(f"{path}: patch_stride={config['patch_stride']} differs from patch_size="
                            f"{config.get('patch_size', 16)}: overlapping patches are not supported")


def config_labels(config: dict, path: Path) -> list[str] | None:
    """Display names from `id2label` (keys "0".."n-1"), or None where the config has none."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        by_index = {int(key): str(value) for key, value in id2label.items()}
    except (AttributeError, ValueError):
        raise HFLayoutError(f"{path}: id2label must map \"0\"..\"n-1\" to names") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise HFLayoutError(f"{path}: id2label keys are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def hf_labels(directory: Path) -> list[str] | None:
    """The display names of an HF-layout directory's `id2label` (only `config.json` is read), or None."""
    config_path = directory / CONFIG_NAME
    return config_labels(_read_config(config_path), config_path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.name == SAFETENSORS_NAME:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise HFLayoutError(f"{path}: not a readable safetensors file ({error})") from None
    try:  # pytorch_model.bin: a pickled state dict, read with the safe unpickler only
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise HFLayoutError(f"{path}: not a plain state dict ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise HFLayoutError(f"{path}: expected a dict of tensors")
    return payload


def read_hf(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an HF-layout directory → (state dict with official names, model description for `create_model`);
    `id2label`, when present, must name every output (`hf_labels` reads it).

    The description gives the CED dimensions explicitly (`embed_dim, depth, num_heads, mlp_ratio, patch_size,
    target_length`, `num_classes` from `outputdim`) under the registered variant of those dimensions.
    """
    config_path, weights_path = hf_files(directory)
    config = _read_config(config_path)
    _check_fixed(config, config_path)
    embed_dim, num_heads = _PRESETS.get(config.get("name"), (config.get("embed_dim", 768), config.get("num_heads", 12)))
    description = {
        "name": _variant_name(embed_dim, config.get("depth", 12), num_heads),
        "num_classes": config.get("outputdim", 527),
        "pooling": "mean",
        "embed_dim": embed_dim,
        "depth": config.get("depth", 12),
        "num_heads": num_heads,
        "mlp_ratio": float(config.get("mlp_ratio", 4.0)),
        "patch_size": config.get("patch_size", 16),
        "target_length": config.get("target_length", 1012),
    }
    labels = config_labels(config, config_path)
    if labels is not None and len(labels) != description["num_classes"]:
        raise HFLayoutError(f"{config_path}: id2label has {len(labels)} names, outputdim is "
                            f"{description['num_classes']}")
    try:
        state_dict = hf_to_official(_load_tensors(weights_path))
    except HFLayoutError as error:
        raise HFLayoutError(f"{weights_path}: {error}") from None
    return state_dict, description


def _variant_name(embed_dim: int, depth: int, num_heads: int) -> str:
    from ced_train.models.registry import is_ced, list_models, variant_dims

    for name in filter(is_ced, list_models()):
        if variant_dims(name) == {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}:
            return name
    return "ced_base"  # any CED builder: the description carries every dimension explicitly


def hf_config(model: torch.nn.Module, class_names: list[str]) -> dict:
    """The `config.json` of `model` (a `CEDModel`) with `id2label` / `label2id` from `class_names`."""
    from ced_train.models.ced import CEDModel

    if not isinstance(model, CEDModel):
        raise HFLayoutError(f"the HF layout holds CED transformers, not {type(model).__name__}")
    if len(class_names) != model.num_classes:
        raise HFLayoutError(f"{len(class_names)} class names for a model with {model.num_classes} outputs")
    block = model.blocks[0]
    dims = (model.embed_dim, block.attn.num_heads)
    name = next((key for key, value in _PRESETS.items() if value == dims), None)
    return {
        "architectures": ["CedForAudioClassification"],
        "model_type": "ced",
        "name": name,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "outputdim": model.num_classes,
        "patch_size": model.patch_size,
        "patch_stride": model.patch_size,
        "target_length": model.target_length,
        **_FIXED,
        "attn_drop_rate": 0.0,
        "drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "loss": "BCELoss",
        "id2label": {str(i): label for i, label in enumerate(class_names)},
        "label2id": {label: i for i, label in enumerate(class_names)},
        "torch_dtype": "float32",
    }


def write_hf(model: torch.nn.Module, out_dir: str | Path, class_names: list[str]) -> Path:
    """Write `model` (a `CEDModel`) as `out_dir/config.json` + `out_dir/model.safetensors` (HF names, float32,
    contiguous); returns `out_dir`. Both are written under temporary names and renamed when complete, so a failed
    write (a full disk) leaves neither behind."""
    from safetensors.torch import save_file

    config = hf_config(model, class_names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().clone() for key, value in official_to_hf(model.state_dict()).items()}
    staged = {name: out_dir / f".{name}.partial" for name in (SAFETENSORS_NAME, CONFIG_NAME)}
    try:
        save_file(tensors, staged[SAFETENSORS_NAME], metadata={"format": "pt"})
        staged[CONFIG_NAME].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        for name, path in staged.items():
            path.replace(out_dir / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return out_dir
