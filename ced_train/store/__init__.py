"""The teacher store: one HDF5 file of per-(clip, view) top-k teacher outputs and the augmentation that produced
each view. Layout, spec and reader in `format`, part files, merge and the pass lock in `writing`, checks and the
command line in `checks`; layout and reasons in docs/store.md.

    python -m ced_train.store info PATH
    python -m ced_train.store verify PATH --shards DIR [--augment configs/augment/ced.yaml]
    python -m ced_train.store import-official LOGITS_DIR --shards DIR --out STORE

The paper's released teacher outputs and their views re-derived from seeds: `official`.
"""

from ced_train.store.checks import info, main, verify
from ced_train.store.format import (
    CHUNK_CLIPS,
    DATASETS,
    FORMAT_VERSION,
    INDEX_DTYPE,
    MISSING_INDEX,
    VALUE_DTYPE,
    StoreError,
    StoreSpec,
    TeacherStore,
    topk_to_dense,
)
from ced_train.store.writing import StoreLock, StoreLockedError, merge_parts, part_is_complete, write_part

__all__ = [
    "CHUNK_CLIPS",
    "DATASETS",
    "FORMAT_VERSION",
    "INDEX_DTYPE",
    "MISSING_INDEX",
    "VALUE_DTYPE",
    "StoreError",
    "StoreLock",
    "StoreLockedError",
    "StoreSpec",
    "TeacherStore",
    "info",
    "main",
    "merge_parts",
    "part_is_complete",
    "topk_to_dense",
    "verify",
    "write_part",
]
