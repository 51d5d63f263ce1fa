"""Judging graphs against the float64 numpy reference of the served maths.

The reference itself (`reference_attention`) lives in the client (attnserve_client/explain/reference.py), whose
BERT encoder runs it too and which may not import model/: one copy, imported here.
"""

from __future__ import annotations

import numpy as np

from attnserve_client.explain.reference import reference_attention as reference_attention


class ParityError(Exception):
    """A graph disagrees with this reference beyond tolerance."""


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖a − e‖₂ / ‖e‖₂ (or ‖a‖₂ when e is all zero)."""
    diff = np.linalg.norm(np.asarray(actual, np.float64) - expected)
    scale = np.linalg.norm(expected)
    return float(diff / scale) if scale > 0 else float(diff)
