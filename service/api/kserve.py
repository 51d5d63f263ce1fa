"""inference.GRPCInferenceService (KServe v2 + Triton's extensions): a few lines per rpc around the core."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import grpc

from service import __version__
from service._pb.inference import grpc_service_pb2 as pb
from service._pb.inference import grpc_service_pb2_grpc as pb_grpc
from service.api import kserve_codec as codec
from service.api.deadlines import deadline_of
from service.api.gate import Undecodable
from service.api.status import grpc_errors, status_of
from service.api.streams import answer_each
from service.core.dataplane import DataPlane
from service.core.limits import fits_name
from service.observe.requests import Observer

SERVER_NAME = "attnserve"
# Triton's names for the protocol extensions served here.
EXTENSIONS = ("model_configuration", "statistics", "streaming")


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, model_name: str, observer: Observer, max_stream_pending: int) -> None:
        self.dataplane = dataplane
        self.observer = observer
        self.name = model_name
        self.max_stream_pending = max_stream_pending

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @grpc_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        codec.check_model(request.name, request.version, self.name)
        return pb.ModelReadyResponse(ready=self.dataplane.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        codec.check_model(request.name, request.version, self.name)
        return codec.model_metadata(self.name, self.dataplane.description.d_model)

    @grpc_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        codec.check_model(request.name, request.version, self.name)
        return codec.model_config(self.name, self.dataplane.description)

    @grpc_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:  # an empty name asks for every model
            codec.check_model(request.name, request.version, self.name)
        return codec.model_statistics(self.name, self.dataplane.stats)

    @grpc_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context, "ModelInfer")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterable[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def answer(request: pb.ModelInferRequest | Undecodable) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, context, "ModelStreamInfer")
                )
            except Exception as error:  # a bad request ends its own answer, not the stream
                _, message = status_of(error)
                failed = pb.ModelInferResponse()
                if not isinstance(request, Undecodable):  # echo what identifies it, unless it is too long to
                    failed.model_name = request.model_name if fits_name(request.model_name) else ""
                    failed.id = request.id if fits_name(request.id) else ""
                return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)

        async for response in answer_each(request_iterator, answer, self.max_stream_pending):
            yield response

    async def _infer(
        self, request: pb.ModelInferRequest | Undecodable, context: grpc.aio.ServicerContext, method: str
    ) -> pb.ModelInferResponse:
        with self.observer.observe("kserve", method, context.invocation_metadata) as seen:
            if isinstance(request, Undecodable):
                raise request.error
            call = codec.infer_request_from_pb(request, self.name)
            call.request.deadline = deadline_of(context)
            seen.request = call.request
            seen.result = await self.dataplane.attend(call.request)
            return codec.infer_response_to_pb(call, seen.result, self.name)
