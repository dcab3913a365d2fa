"""Shards on disk (format, manifest, readers) and the training-side stream.

`ClipStream`, `ClipBatch` and `collate_clips` need torch; they are imported on first use so that
`data_prep`, which only writes shards, starts without loading torch (about 2 s per worker process).
"""

from ced_train.data.manifest import (
    MANIFEST_NAME,
    SKIPPED_NAME,
    Manifest,
    ShardInfo,
    Skip,
    compute_fingerprint,
    read_manifest,
    read_skipped,
    write_manifest,
    write_skipped,
)
from ced_train.data.shards import (
    CODECS,
    SHARD_FORMAT_VERSION,
    Clip,
    ShardFormatError,
    ShardReader,
    ShardWriter,
    check_key,
    decode_audio,
    encode_audio,
    iter_shard,
    read_shard,
)

_STREAM_NAMES = ("ClipStream", "ClipBatch", "collate_clips")

__all__ = [
    "MANIFEST_NAME", "SKIPPED_NAME", "Manifest", "ShardInfo", "Skip", "compute_fingerprint", "read_manifest",
    "read_skipped", "write_manifest", "write_skipped", "CODECS", "SHARD_FORMAT_VERSION", "Clip", "ShardFormatError",
    "ShardReader", "ShardWriter", "check_key", "decode_audio", "encode_audio", "iter_shard", "read_shard",
    *_STREAM_NAMES,
]


def __getattr__(name: str):
    if name in _STREAM_NAMES:
        from ced_train.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'ced_train.data' has no attribute {name!r}")
