"""The committed generated code (service/_pb, and the client's attnserve_client/_pb) matches the protos, and the
KServe v2 service has Triton's method names."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The rpcs tritonclient and perf_analyzer call, with Triton's names.
INFERENCE_RPCS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
)


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _gen_protos()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.relative_to(root).parts
    }


@pytest.mark.parametrize("target", GEN.TARGETS, ids=lambda t: t.package)
def test_generated_code_is_up_to_date(tmp_path: Path, target: Any) -> None:
    pytest.importorskip("grpc_tools")
    fresh_dir = tmp_path / "_pb"
    GEN.generate(fresh_dir, package=target.package, protos=target.protos())
    fresh, committed = _tree(fresh_dir), _tree(target.out_dir)

    where = target.out_dir.relative_to(ROOT).as_posix()
    hint = f"{where} is out of date with proto/: run `make protos` and commit the result"
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    stale = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    assert not missing, f"missing from {where}: {missing}. {hint}"
    assert not extra, f"in {where} but generated from no proto: {extra}. {hint}"
    assert not stale, f"differ from the generated code: {stale}. {hint}"


def test_the_client_has_attnserve_v1_alone() -> None:
    """The client's stubs: attnserve.v1, imported from its own package; no KServe (it never calls it)."""
    client = next(t for t in GEN.TARGETS if t.package == "attnserve_client._pb")
    assert set(_tree(client.out_dir)) == {
        "__init__.py", "attnserve/__init__.py", "attnserve/v1/__init__.py", "attnserve/v1/attention_pb2.py",
        "attnserve/v1/attention_pb2.pyi", "attnserve/v1/attention_pb2_grpc.py",
    }  # fmt: skip
    grpc_module = (client.out_dir / "attnserve" / "v1" / "attention_pb2_grpc.py").read_text()
    assert "from attnserve_client._pb.attnserve.v1 import attention_pb2" in grpc_module


def test_generation_is_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    GEN.generate(tmp_path / "a")
    GEN.generate(tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_inference_service_has_triton_method_names() -> None:
    from service._pb.inference import grpc_service_pb2, grpc_service_pb2_grpc

    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(INFERENCE_RPCS) <= set(service.methods_by_name)
    for rpc in INFERENCE_RPCS:
        assert hasattr(grpc_service_pb2_grpc.GRPCInferenceServiceServicer, rpc)
        assert hasattr(grpc_service_pb2_grpc.GRPCInferenceService, rpc)  # the experimental client API

    # The full method names the client stub calls: what stock clients send on the wire.
    calls: dict[str, str] = {}

    class _Channel:
        def __getattr__(self, kind: str) -> Callable[..., None]:
            def register(method: str, *args: object, **kwargs: object) -> None:
                calls[method] = kind

            return register

    grpc_service_pb2_grpc.GRPCInferenceServiceStub(_Channel())
    for rpc in INFERENCE_RPCS:
        kind = "stream_stream" if rpc == "ModelStreamInfer" else "unary_unary"
        assert calls.get(f"/inference.GRPCInferenceService/{rpc}") == kind, rpc

    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.input_type.name == "ModelInferRequest"
    assert stream.output_type.name == "ModelStreamInferResponse"
    assert not service.methods_by_name["ModelInfer"].client_streaming


def test_wire_field_numbers_match_triton() -> None:
    """The fields stock clients rely on most, by number: a renumbering here breaks them silently."""
    from service._pb.inference import grpc_service_pb2 as pb
    from service._pb.inference import model_config_pb2 as mc

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.ModelInferRequest) == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
        "raw_input_contents": 7,
    }  # fmt: skip
    assert numbers(pb.ModelInferResponse) == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "outputs": 5, "raw_output_contents": 6,
    }  # fmt: skip
    assert numbers(pb.ModelInferRequest.InferInputTensor) == {
        "name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5,
    }  # fmt: skip
    assert numbers(pb.ModelStreamInferResponse) == {"error_message": 1, "infer_response": 2}
    assert numbers(mc.ModelConfig) == {
        "name": 1, "platform": 2, "backend": 17, "version_policy": 3, "max_batch_size": 4, "input": 5,
        "output": 6, "dynamic_batching": 11, "instance_group": 7, "parameters": 14,
        "model_transaction_policy": 19,
    }  # fmt: skip
    assert numbers(mc.ModelInput) == {
        "name": 1, "data_type": 2, "format": 3, "dims": 4, "reshape": 5, "is_shape_tensor": 6,
        "allow_ragged_batch": 7, "optional": 8,
    }  # fmt: skip
    assert mc.DataType.Value("TYPE_FP16") == 10 and mc.DataType.Value("TYPE_FP32") == 11
    assert mc.DataType.Value("TYPE_BF16") == 14
