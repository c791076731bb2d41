"""Storage: atomic writes, small JSON files, local-path checks, and the synthetic-dataset format."""

from lbgen.storage.dataset_format import (
    INDEX_SUFFIX,
    INTERNAL_KEYS,
    MANIFEST_FILE,
    RUN_FILE,
    SHARD_DIR,
    SHARD_SUFFIX,
    complete_shards,
    decode_png,
    export_image_folder,
    load_images,
    png_bytes,
    read_index,
    read_manifest,
    read_shard,
    safe_folder_name,
    write_shard,
)
from lbgen.storage.files import atomic_write, atomic_write_json, looks_local, read_json

__all__ = ["INDEX_SUFFIX", "INTERNAL_KEYS", "MANIFEST_FILE", "RUN_FILE", "SHARD_DIR", "SHARD_SUFFIX", "atomic_write",
           "atomic_write_json", "complete_shards", "decode_png", "export_image_folder", "load_images", "looks_local",
           "png_bytes", "read_index", "read_json", "read_manifest", "read_shard", "safe_folder_name", "write_shard"]
