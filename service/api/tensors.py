"""Bytes <-> numpy for both APIs: shape and byte-count checks with messages that name the field."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.core.errors import InvalidInput

# Wire element types (KServe v2 names) and their little-endian numpy dtypes.
WIRE_DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
# gRPC messages stay under 2 GiB, so no tensor that can arrive has more elements; larger shapes (possible only
# with a zero dimension beside them) are refused before numpy is asked to make them and overflows.
MAX_ELEMENTS = 2**31
MAX_SHOWN_RANK = 8  # a wrong shape is quoted in the error up to this many dimensions


def check_shape(field: str, shape: Sequence[int], names: Sequence[str]) -> tuple[int, ...]:
    """The shape as a tuple, if it has one non-negative dimension per name."""
    if len(shape) != len(names):  # counted before it is read: a shape may carry a million dimensions
        seen = f"shape {[int(d) for d in shape]}" if len(shape) <= MAX_SHOWN_RANK else "shape"
        raise InvalidInput(f"{field}: {seen} has rank {len(shape)}; expected [{', '.join(names)}]")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"{field}: shape {list(dims)} has a negative dimension; dimensions must be ≥ 0")
    if math.prod(d for d in dims if d) > MAX_ELEMENTS:
        raise InvalidInput(
            f"{field}: shape {list(dims)} is too large; its nonzero dimensions may multiply to at most {MAX_ELEMENTS}"
        )
    return dims


def array_from_bytes(field: str, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-copy read-only view of little-endian row-major bytes, after checking their count."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{field}: {len(data)} bytes received; shape {list(shape)} of {dtype_name(dtype)} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def dtype_name(dtype: np.dtype) -> str:
    return next(name for name, wire in WIRE_DTYPES.items() if wire == dtype)


def compute_states(x: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """(the hidden states in FP32, which the graphs compute in; the dtype the answer goes back in)."""
    return (x if x.dtype == np.float32 else x.astype(np.float32)), x.dtype
