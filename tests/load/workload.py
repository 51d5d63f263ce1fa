"""What a load run sends: a mix of sequence lengths, and requests for either API, encoded once up front.

Client CPU is kept small so that on a small machine the server gets the cores: every distinct request is
serialized once, before the run, and sent as raw bytes; a run cycles through a pool of requests whose
lengths were drawn from the mix (requests of equal length share one payload). With a reference (the
service's own Engine, in process), the expected answer of every distinct request is computed up front too,
so a sampled answer is checked against it (relative L2 ≤ 1e-5) at the cost of one parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf.message import Message

from model.reference import relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.inference import grpc_service_pb2 as kserve_pb
from service.api.v1_codec import tensor_from_pb, tensor_to_pb

if TYPE_CHECKING:
    from service.engine.sessions import Engine

TOLERANCE = 1e-5  # relative L2 of an answer against in-process onnxruntime
STREAM_ERROR = "STREAM_ERROR"  # KServe stream errors carry a message and no status code
MAX_POOL_BYTES = 1 << 30  # distinct payloads kept in memory


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    d_model: int = 512

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def nbytes(self) -> int:
        return self.tokens * self.d_model * 4  # FP32

    def __str__(self) -> str:
        return f"({self.batch},{self.seq},{self.d_model})"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """From "1,128,512" or "(1,128,512)"."""
        batch, seq, d_model = (int(part) for part in text.strip("() ").split(","))
        return cls(batch, seq, d_model)


@dataclass(frozen=True)
class LengthMix:
    """The sequence lengths a run draws from: one length, a uniform integer range, or a weighted list.

    Text forms (what --lengths takes): "128"; "8-512" (uniform, both ends included); "16:3,128:1,512"
    (16 three times as often as 128 or 512; a missing weight is 1)."""

    values: tuple[int, ...]  # the lengths, or (low, high) of a uniform range
    weights: tuple[float, ...] | None = None  # per value; None: uniform over `values` or over the range
    uniform_range: bool = False

    @classmethod
    def fixed(cls, seq: int) -> LengthMix:
        return cls((seq,))

    @classmethod
    def parse(cls, text: str) -> LengthMix:
        try:
            if "-" in text:
                low, high = (int(part) for part in text.split("-"))
                mix = cls((low, high), uniform_range=True)
            else:
                pairs = [item.split(":") for item in text.split(",")]
                values = tuple(int(pair[0]) for pair in pairs)
                weights = tuple(float(pair[1]) if len(pair) == 2 else 1.0 for pair in pairs)
                mix = cls(values, weights if len(values) > 1 else None)
        except ValueError:
            raise ValueError(
                f"sequence lengths {text!r}: expected a length (128), a range (8-512) or a weighted list "
                "(16:3,128:1,512)"
            ) from None
        mix.check()
        return mix

    def check(self) -> None:
        if any(v < 1 for v in self.values):
            raise ValueError(f"sequence lengths {self}: every length must be ≥ 1")
        if self.uniform_range and self.values[0] > self.values[1]:
            raise ValueError(f"sequence lengths {self}: the range's low end is above its high end")
        if self.weights is not None and (len(self.weights) != len(self.values) or min(self.weights) <= 0):
            raise ValueError(f"sequence lengths {self}: one weight > 0 per length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.uniform_range:
            return rng.integers(self.values[0], self.values[1], endpoint=True, size=n).tolist()
        if len(self.values) == 1:
            return [self.values[0]] * n
        p = None if self.weights is None else np.asarray(self.weights) / sum(self.weights)
        return rng.choice(self.values, size=n, p=p).tolist()

    def __str__(self) -> str:
        if self.uniform_range:
            return f"{self.values[0]}-{self.values[1]}"
        if self.weights is None:
            return ",".join(map(str, self.values))
        return ",".join(f"{v}:{w:g}" for v, w in zip(self.values, self.weights, strict=True))


# The answer a reference computes for hidden states: (output, attention weights or None).
Reference = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Api:
    """One protocol: its methods, how to encode a request and how to read an answer."""

    name: str
    unary_method: str  # full method paths, e.g. /inference.GRPCInferenceService/ModelInfer
    stream_method: str
    encode: Callable[[np.ndarray, bool], Message]  # (hidden states, want weights) -> request message
    parse: Callable[[bytes], Message]  # a unary answer
    results: Callable[[Message], tuple[np.ndarray, np.ndarray | None]]  # answer -> (output, weights)
    unwrap_stream: Callable[[bytes], tuple[Message | None, str | None]]  # -> (answer, error code name)


@dataclass(frozen=True)
class Request:
    payload: bytes  # the serialized request message
    tokens: int  # tokens it asks the model to process (for tokens/s)
    seq: int  # its sequence length (for the per-bucket figures)
    check: Callable[[Message], None] | None = None  # raises ValueError when an answer is wrong


@dataclass(frozen=True)
class Target:
    """What to send: one API and the requests to cycle through, each already serialized."""

    name: str
    api: Api
    requests: tuple[Request, ...]
    mix: LengthMix

    @property
    def method(self) -> str:
        return self.api.unary_method

    def without_check(self) -> Target:
        """The same requests, answers unchecked (for the echo server, which returns the request bytes)."""
        return replace(self, requests=tuple(replace(r, check=None) for r in self.requests))


def hidden_states(shape: Shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((shape.batch, shape.seq, shape.d_model), dtype=np.float32)


# --- KServe v2 ---------------------------------------------------------------------------------------------


def kserve_request(
    x: np.ndarray, model_name: str = "attention", request_id: str = "", weights: bool = False
) -> kserve_pb.ModelInferRequest:
    """ModelInfer with hidden_states FP32 in raw_input_contents (no mask); default outputs unless weights."""
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(name="hidden_states", datatype="FP32", shape=x.shape)
    outputs = [
        kserve_pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
        for name in (("output", "attention_weights") if weights else ())
    ]
    return kserve_pb.ModelInferRequest(
        model_name=model_name, id=request_id, inputs=[tensor], outputs=outputs, raw_input_contents=[x.tobytes()]
    )


def _kserve_results(response: Message) -> tuple[np.ndarray, np.ndarray | None]:
    assert isinstance(response, kserve_pb.ModelInferResponse)
    if len(response.raw_output_contents) != len(response.outputs):
        raise ValueError("ModelInfer answer without raw_output_contents for each output")
    found = {
        out.name: np.frombuffer(raw, np.float32).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    if "output" not in found:
        raise ValueError(f"ModelInfer answered outputs {sorted(found)}, without `output`")
    return found["output"], found.get("attention_weights")


def _kserve_unwrap(answer: bytes) -> tuple[Message | None, str | None]:
    wrapped = kserve_pb.ModelStreamInferResponse.FromString(answer)
    return (None, STREAM_ERROR) if wrapped.error_message else (wrapped.infer_response, None)


KSERVE = Api(
    name="kserve",
    unary_method="/inference.GRPCInferenceService/ModelInfer",
    stream_method="/inference.GRPCInferenceService/ModelStreamInfer",
    encode=lambda x, weights: kserve_request(x, weights=weights),
    parse=kserve_pb.ModelInferResponse.FromString,
    results=_kserve_results,
    unwrap_stream=_kserve_unwrap,
)


# --- attnserve.v1 ------------------------------------------------------------------------------------------


def _v1_request(x: np.ndarray, weights: bool) -> v1_pb.AttendRequest:
    """Attend, every sequence full length; with weights: every query row of every head."""
    request = v1_pb.AttendRequest(hidden_states=tensor_to_pb(x))
    if weights:
        request.weights.SetInParent()
    return request


def _v1_results(response: Message) -> tuple[np.ndarray, np.ndarray | None]:
    assert isinstance(response, v1_pb.AttendResponse)
    output = tensor_from_pb("output", response.output, ("b", "s", "d"), (v1_pb.FP32,))
    if not response.HasField("weights"):
        return output, None
    return output, tensor_from_pb("weights", response.weights.values, ("b", "h", "q", "k"), (v1_pb.FP32,))


def _v1_unwrap(answer: bytes) -> tuple[Message | None, str | None]:
    wrapped = v1_pb.AttendStreamResponse.FromString(answer)
    if wrapped.WhichOneof("result") == "error":
        return None, _code_name(wrapped.error.code)
    return wrapped.response, None


def _code_name(value: int) -> str:
    """The grpc.StatusCode name of a google.rpc.Code value."""
    return next((code.name for code in grpc.StatusCode if code.value[0] == value), "UNKNOWN")


V1 = Api(
    name="v1",
    unary_method="/attnserve.v1.AttentionService/Attend",
    stream_method="/attnserve.v1.AttentionService/AttendStream",
    encode=_v1_request,
    parse=v1_pb.AttendResponse.FromString,
    results=_v1_results,
    unwrap_stream=_v1_unwrap,
)

APIS: dict[str, Api] = {api.name: api for api in (KSERVE, V1)}


# --- targets -----------------------------------------------------------------------------------------------


def answer_check(
    api: Api, shape: tuple[int, ...], weights: bool, expected: tuple[np.ndarray, np.ndarray | None] | None
) -> Callable[[Message], None]:
    """A check of one answer: its output shape (and weights when asked for) and, with `expected`, its values."""

    def check(response: Message) -> None:
        output, probs = api.results(response)
        if output.shape != shape:
            raise ValueError(f"answer output shape {output.shape}; expected {shape}")
        if weights and (probs is None or probs.shape[:1] != shape[:1] or probs.shape[2:] != (shape[1], shape[1])):
            raise ValueError(f"answer weights {None if probs is None else probs.shape}; expected (b, h, s, s)")
        if expected is None:
            return
        error = relative_l2(output, expected[0])
        if weights and expected[1] is not None:
            error = max(error, relative_l2(probs, expected[1]))
        if not error <= TOLERANCE:
            raise ValueError(f"answer differs from in-process onnxruntime: relative L2 {error:.2e} > {TOLERANCE}")

    return check


def build_target(
    api: Api | str, mix: LengthMix, *, batch: int = 1, d_model: int = 512, pool: int = 64, weights: bool = False,
    reference: Reference | None = None, seed: int = 0,
) -> Target:  # fmt: skip
    """`pool` requests with lengths drawn from `mix`; equal lengths share one payload and expected answer."""
    api = APIS[api] if isinstance(api, str) else api
    lengths = mix.sample(np.random.default_rng(seed), 1 if len(mix.values) == 1 and not mix.uniform_range else pool)
    distinct: dict[int, Request] = {}
    pool_bytes = 0
    for seq in sorted(set(lengths)):
        x = hidden_states(Shape(batch, seq, d_model), seed + seq)
        pool_bytes += x.nbytes
        if pool_bytes > MAX_POOL_BYTES:
            raise ValueError(f"the request pool needs over {MAX_POOL_BYTES >> 20} MiB; use a smaller pool or mix")
        expected = reference(x, weights) if reference is not None else None
        check = answer_check(api, x.shape, weights, expected)
        distinct[seq] = Request(api.encode(x, weights).SerializeToString(), batch * seq, seq, check)
    name = f"{api.name} b={batch} seq={mix}{' +weights' if weights else ''}"
    return Target(name, api, tuple(distinct[seq] for seq in lengths), mix)


def kserve_target(shape: Shape, seed: int = 0) -> Target:
    """KServe v2 ModelInfer of one shape, hidden_states FP32 in raw_input_contents, output `output`."""
    return build_target(KSERVE, LengthMix.fixed(shape.seq), batch=shape.batch, d_model=shape.d_model, seed=seed)


def v1_target(shape: Shape, seed: int = 0) -> Target:
    """attnserve.v1 Attend of one shape, hidden_states FP32, every sequence full length, no weights."""
    return build_target(V1, LengthMix.fixed(shape.seq), batch=shape.batch, d_model=shape.d_model, seed=seed)


def engine_reference(engine: Engine) -> Reference:
    """In-process onnxruntime: the service's own Engine (on the CPU provider, for a reference)."""

    def reference(x: np.ndarray, weights: bool) -> tuple[np.ndarray, np.ndarray | None]:
        result = engine.run(x, None, want_probs=weights)
        return result.output, result.probs

    return reference


def model_dir_reference(model_dir: Path) -> Reference:
    """engine_reference over a model directory, on the CPU provider."""
    from service.engine.model_dir import load_model_directory
    from service.engine.sessions import Engine

    return engine_reference(Engine(load_model_directory(model_dir), "cpu"))
