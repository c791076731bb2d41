"""Files lbgen writes and reads: atomic writes, small JSON files, hub-id-or-local-path checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never half of one.

    The bytes go to a temporary file in the same folder (named per process, so two processes writing one path do
    not share it), are flushed to disk, then renamed over ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """``obj`` as JSON, written with ``atomic_write``."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a JSON file; a damaged one raises ``ValueError`` naming the file, the parse error and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None


def looks_local(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` means a local path rather than a hub id (``name`` or ``namespace/name``).

    An existing path, one starting with ``.``, ``/`` or ``~``, one with more than one ``/`` or a backslash, or one
    ending in one of ``file_suffixes`` (e.g. ``.safetensors``) is local: a loader must then never go to the network,
    and a missing one is an error that names the path.
    """
    path = Path(name).expanduser()
    return (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or (bool(file_suffixes) and path.suffix in file_suffixes))
