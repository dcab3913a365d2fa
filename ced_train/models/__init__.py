"""Taggers (CED audio transformers, timm CNNs on the same front end): `create_model(name, **kwargs)` and
`load_checkpoint(path)`.

The names below load their module on first use (as `ced_train.data` does for its stream): the model needs timm,
about 2.5 s to import, while `ced_train.augment` and the store tools only need the front end's grid constants from
`ced_train.models.frontend`.
"""

from importlib import import_module

_MODULE_OF = {
    "CEDModel": "ced",
    "CheckpointError": "checkpoint",
    "CNNTagger": "cnn",
    "describe_model": "checkpoint",
    "InitSummary": "checkpoint",
    "init_from_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_weights": "checkpoint",
    "read_checkpoint": "checkpoint",
    "LogMelFrontEnd": "frontend",
    "create_model": "registry",
    "is_ced": "registry",
    "list_models": "registry",
    "register_variant": "registry",
    "variant_dims": "registry",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(import_module(f"ced_train.models.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'ced_train.models' has no attribute {name!r}")
