"""attnserve.v1.AttentionService: a few lines per rpc around the core."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import grpc

from service._pb.attnserve.v1 import attention_pb2 as pb
from service._pb.attnserve.v1 import attention_pb2_grpc as pb_grpc
from service.api import v1_codec as codec
from service.api.deadlines import deadline_of
from service.api.gate import Undecodable
from service.api.status import grpc_errors, status_of
from service.api.streams import answer_each
from service.core.dataplane import DataPlane
from service.core.limits import fits_name
from service.observe.requests import Observer


class AttentionServicer(pb_grpc.AttentionServiceServicer):
    def __init__(self, dataplane: DataPlane, model_name: str, observer: Observer, max_stream_pending: int) -> None:
        self.max_stream_pending = max_stream_pending
        self.dataplane = dataplane
        self.observer = observer
        self.model_name = model_name

    @grpc_errors
    async def Attend(self, request: pb.AttendRequest, context: grpc.aio.ServicerContext) -> pb.AttendResponse:
        return await self._attend(request, context, "Attend")

    async def AttendStream(
        self, request_iterator: AsyncIterable[pb.AttendRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AttendStreamResponse]:
        async def answer(request: pb.AttendRequest | Undecodable) -> pb.AttendStreamResponse:
            # The answer carries the request's id, unless it is too long to echo (an error says so).
            id_ = "" if isinstance(request, Undecodable) or not fits_name(request.id) else request.id
            try:
                response = await self._attend(request, context, "AttendStream")
                return pb.AttendStreamResponse(id=id_, response=response)
            except Exception as error:  # a bad request ends its own answer, not the stream
                code, message = status_of(error)
                return pb.AttendStreamResponse(id=id_, error=pb.Error(code=code.value[0], message=message))

        async for response in answer_each(request_iterator, answer, self.max_stream_pending):
            yield response

    @grpc_errors
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return codec.model_info_to_pb(self.model_name, self.dataplane.description)

    async def _attend(
        self, request: pb.AttendRequest | Undecodable, context: grpc.aio.ServicerContext, method: str
    ) -> pb.AttendResponse:
        with self.observer.observe("v1", method, context.invocation_metadata) as seen:
            if isinstance(request, Undecodable):
                raise request.error
            core_request = codec.attend_request_from_pb(request)
            core_request.deadline = deadline_of(context)
            seen.request = core_request
            seen.result = await self.dataplane.attend(core_request)
            return codec.attend_response_to_pb(core_request, seen.result)
