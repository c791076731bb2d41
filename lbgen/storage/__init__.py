"""Storage: atomic writes, small JSON files, local-path checks, and the synthetic-dataset format."""

from lbgen.storage.files import atomic_write, atomic_write_json, looks_local, read_json

__all__ = ["atomic_write", "atomic_write_json", "looks_local", "read_json"]
