"""The relay's tests run on every packet path built here (proxy.media.packet_path): a
module opts in with ``pytestmark = pytest.mark.usefixtures("relay_path")``. Where the
compiled path was not built (no compiler or no libsrtp2), only the Python path runs; CI
builds it, and ``tests/media/test_fast_path.py`` fails there if it is missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.media import packet_path
from proxy.media.packet_path import built_paths


@pytest.fixture(params=built_paths())
def relay_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Engines made in the test (``RelayEngine(fast_path=None)``) run this path."""
    saved = packet_path.default_mode
    packet_path.default_mode = "on" if request.param == "fast" else "off"
    try:
        yield str(request.param)
    finally:
        packet_path.default_mode = saved
