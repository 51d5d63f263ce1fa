"""Which code a report's numbers came from."""

from __future__ import annotations

import subprocess

from bench.harness import ROOT


def code_version() -> str:
    """The commit, and whether service/ differs from it: the servers run whatever is on disk when they start."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "service"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{commit} + uncommitted changes in service/" if changed else commit
