"""Support code for the tests (``tests/``) and the benchmarks (``bench/``); not shipped.

One home for what every harness needs, instead of a copy per file:

* :mod:`testkit.ports`: free loopback ports and port blocks, never handed out twice in
  one process, never the proxy's default ports;
* :mod:`testkit.processes`: subprocesses with output to a file, waited for with a
  timeout and stopped by their PID (SIGTERM, then SIGKILL to their process group);
* :mod:`testkit.proxy`: a ``sipura-proxy run`` under test: config written from
  parameters, started, waited for until ``/status`` answers, queried, stopped;
* :mod:`testkit.pki`: a throwaway CA and its lines' credentials and files.

The lower layer (bind-tested ports, the admin client, the proxy process) is
:mod:`proxy.demo.loopback`, which ships because ``sipura-proxy demo`` needs it too.

``testkit`` lives at the repository root, next to ``proxy``: ``python -m pytest`` finds
it through ``tests/conftest.py`` (and pytest's ``pythonpath``), ``python bench/X.py``
through the path insert at the top of each bench script. ``pyproject.toml`` packages
``proxy*`` only, so the wheel never contains it.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the working directory and ``PYTHONPATH`` of proxies under test."""
