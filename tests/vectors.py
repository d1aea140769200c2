"""Locate and load the shared official BIP test vectors (../shared/vectors from the repo root).

Kept tiny on purpose: tests from every directory use it so that the path to the vectors is
computed in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def vectors_dir() -> Path:
    """The shared vectors folder: ``<repo root>/../shared/vectors``."""
    return REPO_ROOT.parent / "shared" / "vectors"


def load_json(name: str) -> Any:
    """Parse one vectors file by name (``"bip143.json"`` or just ``"bip143"``).

    Typed ``Any`` on purpose: tests index into the parsed JSON directly.
    """
    if not name.endswith(".json"):
        name += ".json"
    with (vectors_dir() / name).open(encoding="utf-8") as fh:
        return json.load(fh)


def data_dir() -> Path:
    """The repository's own test data folder: ``tests/data``."""
    return REPO_ROOT / "tests" / "data"
