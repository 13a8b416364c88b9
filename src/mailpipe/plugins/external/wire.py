"""The gRPC methods of the plugin protocol, by their full paths, for both sides.

Hand-written instead of protoc's *_pb2_grpc modules: six methods do not need a code
generator whose output pins a grpcio version. Message classes are the generated *_pb2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2

from mailpipe.plugins.external.proto import grpc_controller_pb2 as controller_pb2
from mailpipe.plugins.external.proto import grpc_stdio_pb2 as stdio_pb2
from mailpipe.plugins.external.proto import plugin_pb2 as pb

# go-plugin's handshake values for mailpipe (proto/mailpipe/plugin/v1/plugin.proto).
COOKIE_KEY = "MAILPIPE_PLUGIN"
COOKIE_VALUE = "d5a1c8e0-mailpipe-plugin-v1"
CORE_PROTOCOL_VERSION = 1
APP_PROTOCOL_VERSION = 1
HEALTH_SERVICE = "plugin"  # go-plugin's GRPCServiceName: the host pings this service name
MAX_MESSAGE = 2**31 - 1  # go-plugin dials with math.MaxInt32 both ways
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


@dataclass(frozen=True, slots=True)
class Method:
    service: str
    name: str
    request: Any
    response: Any
    stream: bool = False  # server streaming

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


HOOKS_IMPLEMENTED = Method("mailpipe.plugin.v1.Hooks", "Implemented", pb.HooksRequest,
                           pb.HooksResponse)
HOOKS_CALL = Method("mailpipe.plugin.v1.Hooks", "Call", pb.HookCall, pb.HookResult)
SELECTOR_SELECT = Method("mailpipe.plugin.v1.Selector", "Select", pb.SelectRequest,
                         pb.SelectResponse)
CONTROLLER_SHUTDOWN = Method("plugin.GRPCController", "Shutdown", controller_pb2.Empty,
                             controller_pb2.Empty)
STDIO_STREAM = Method("plugin.GRPCStdio", "StreamStdio", empty_pb2.Empty, stdio_pb2.StdioData,
                      stream=True)


def stub(channel: Any, method: Method) -> Any:
    """A callable for `method` on a grpc.aio channel."""
    make = channel.unary_stream if method.stream else channel.unary_unary
    return make(method.path, request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString)


def handler(method: Method, behaviour: Any) -> Any:
    """The server-side handler of `method` (grpc.aio servicer function)."""
    import grpc

    make = grpc.unary_stream_rpc_method_handler if method.stream else \
        grpc.unary_unary_rpc_method_handler
    return make(behaviour, request_deserializer=method.request.FromString,
                response_serializer=method.response.SerializeToString)


def service(name: str, handlers: dict[str, Any]) -> Any:
    import grpc

    return grpc.method_handlers_generic_handler(name, handlers)
