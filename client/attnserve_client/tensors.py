"""numpy <-> attnserve.v1 Tensor, on the client's side: conversion only.

The server checks every tensor it receives (dtype, rank, byte count) and answers INVALID_ARGUMENT naming the field;
those checks are the server's own (service/api/), and the client needs neither them nor the server's code. It packs
what it sends and unpacks what the server sends back; a tensor that cannot be unpacked is a server bug and raises
ValueError (from numpy's reshape when the bytes do not fit the shape).
"""

from __future__ import annotations

import numpy as np

from attnserve_client._pb.attnserve.v1 import attention_pb2 as pb

# attnserve.v1.DataType <-> numpy: little-endian, as on the wire.
DTYPES: dict[int, np.dtype] = {pb.FP32: np.dtype("<f4"), pb.FP16: np.dtype("<f2"), pb.INT32: np.dtype("<i4")}


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> pb.Tensor:
    """Write `array` into a Tensor field in place (building a Tensor and assigning it would copy the bytes again)."""
    little = array.dtype.newbyteorder("<")
    dtype = next((code for code, dt in DTYPES.items() if dt == little), None)
    if dtype is None:
        raise TypeError(f"{array.dtype} cannot travel as an attnserve.v1 Tensor; use float32, float16 or int32")
    tensor.dtype = dtype  # type: ignore[assignment]  # the stubs type the enum field as DataType, not int
    tensor.shape[:] = array.shape
    tensor.data = np.ascontiguousarray(array, little).tobytes()
    return tensor


def tensor_to_pb(array: np.ndarray) -> pb.Tensor:
    """A new Tensor holding a copy of `array`'s bytes."""
    return fill_tensor(pb.Tensor(), array)


def tensor_from_pb(tensor: pb.Tensor) -> np.ndarray:
    """A read-only view of the tensor's bytes in its shape (no copy)."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"Tensor dtype {tensor.dtype} is not one attnserve.v1 sends (FP32, FP16, INT32)")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
