"""Shared fixtures: the x-sipura test vectors (a copy of the profile's vectors.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "xsipura_vectors.json").read_text())
    return data
