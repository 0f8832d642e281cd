"""Errors shared by the command-line edge."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the operator: printed as one line, exit code 2."""
