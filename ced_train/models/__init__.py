"""CED audio transformers: `create_model(name, **kwargs)` and `load_checkpoint(path)`."""

from ced_train.models.ced import CEDModel
from ced_train.models.checkpoint import CheckpointError, load_checkpoint, load_weights, read_checkpoint
from ced_train.models.frontend import LogMelFrontEnd
from ced_train.models.registry import create_model, list_models, register_variant, variant_dims

__all__ = [
    "CEDModel",
    "CheckpointError",
    "LogMelFrontEnd",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "register_variant",
    "variant_dims",
]
