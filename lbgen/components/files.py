"""Reading the small JSON files lbgen writes (manifests' run files, banks, confusion matrices, model indexes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a JSON file; a damaged one raises ``ValueError`` naming the file, the parse error and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None
