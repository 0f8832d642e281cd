"""`python -m proxy` is the same as the `sipura-proxy` console script."""

from proxy.cli import run

run()
