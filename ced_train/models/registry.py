"""Named model variants: `create_model(name, **kwargs)` is the one constructor; configs name variants by string.

A variant is a builder (`CEDModel`, or `CNNTagger` for the timm CNNs) and its preset arguments. `cnn` is the
open-ended CNN entry: `create_model("cnn", arch="<any timm CNN>")`; checkpoints record `arch` (`build_kwargs`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ced_train.models.ced import CEDModel
from ced_train.models.cnn import CNNTagger

_VARIANTS: dict[str, tuple[Callable[..., nn.Module], dict]] = {}


def register_variant(name: str, builder: Callable[..., nn.Module] = CEDModel, **dims) -> None:
    """Register `name` as `builder(**dims, **kwargs)` (a set of `CEDModel` dimensions by default)."""
    if name in _VARIANTS:
        raise ValueError(f"model variant {name!r} is already registered")
    _VARIANTS[name] = (builder, dims)


def list_models() -> list[str]:
    return sorted(_VARIANTS)


def variant_dims(name: str) -> dict:
    """The preset arguments of `name` (for CED: embed_dim, depth, num_heads; for CNNs: arch)."""
    return dict(_variant(name)[1])


def is_ced(name: str) -> bool:
    """Whether variant `name` is a CED transformer (whose size a bare state dict tells)."""
    return _variant(name)[0] is CEDModel


def create_model(name: str, **kwargs) -> nn.Module:
    """Build variant `name`; `kwargs` (num_classes, pooling, drop_path_rate, arch, ...) override or extend its presets."""
    builder, dims = _variant(name)
    return builder(**{**dims, **kwargs})


def _variant(name: str) -> tuple[Callable[..., nn.Module], dict]:
    if name not in _VARIANTS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _VARIANTS[name]


# The four published sizes (all depth 12, 16x16 patches) and a test-sized variant for fast tests.
register_variant("ced_tiny", embed_dim=192, depth=12, num_heads=3)
register_variant("ced_mini", embed_dim=256, depth=12, num_heads=4)
register_variant("ced_small", embed_dim=384, depth=12, num_heads=6)
register_variant("ced_base", embed_dim=768, depth=12, num_heads=12)
register_variant("ced_test", embed_dim=64, depth=2, num_heads=2)
# timm CNNs on the same front end: fast, data-efficient teachers (the demo's), and any other trunk by `arch`.
register_variant("cnn", CNNTagger)
register_variant("mobilenetv3_small", CNNTagger, arch="mobilenetv3_small_100")
register_variant("mobilenetv3_large", CNNTagger, arch="mobilenetv3_large_100")
register_variant("efficientnet_b0", CNNTagger, arch="efficientnet_b0")
register_variant("resnet18", CNNTagger, arch="resnet18")
