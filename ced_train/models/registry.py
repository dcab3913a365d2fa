"""Named CED variants: `create_model(name, **kwargs)` is the one constructor; configs name variants by string."""

from __future__ import annotations


from ced_train.models.ced import CEDModel

_VARIANTS: dict[str, dict] = {}


def register_variant(name: str, **dims) -> None:
    """Register a named set of `CEDModel` dimensions."""
    if name in _VARIANTS:
        raise ValueError(f"model variant {name!r} is already registered")
    _VARIANTS[name] = dims


def list_models() -> list[str]:
    return sorted(_VARIANTS)


def variant_dims(name: str) -> dict:
    """The registered dimensions of `name` (embed_dim, depth, num_heads)."""
    if name not in _VARIANTS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return dict(_VARIANTS[name])


def create_model(name: str, **kwargs) -> CEDModel:
    """Build variant `name`; `kwargs` (num_classes, pooling, drop_path_rate, ...) override or extend its dims."""
    return CEDModel(**{**variant_dims(name), **kwargs})


# The four published sizes (all depth 12, 16x16 patches) and a test-sized variant for fast tests.
register_variant("ced_tiny", embed_dim=192, depth=12, num_heads=3)
register_variant("ced_mini", embed_dim=256, depth=12, num_heads=4)
register_variant("ced_small", embed_dim=384, depth=12, num_heads=6)
register_variant("ced_base", embed_dim=768, depth=12, num_heads=12)
register_variant("ced_test", embed_dim=64, depth=2, num_heads=2)

