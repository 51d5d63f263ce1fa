"""Server interceptors: the bearer-token check, which health probes bypass."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from service.api.status import status_of
from service.errors import ServiceError, Unauthenticated

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _refusing(handler: grpc.RpcMethodHandler, error: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with the error's status."""
    code, message = status_of(error)

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks needs `authorization: Bearer <token>` metadata."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        sent = metadata.get("authorization", "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent_bytes, self._expected):
            return handler
        reason = "missing" if not sent else "wrong"
        return _refusing(
            handler,
            Unauthenticated(
                f"authorization metadata {reason}; send `authorization: Bearer <token>` with the server's token"
            ),
        )
