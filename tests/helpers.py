"""Small helpers shared by several test modules (pytest puts this folder on the import path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list) -> Path:
    """Write one JSON line per record (a string record is written as it is, e.g. a blank or broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path
