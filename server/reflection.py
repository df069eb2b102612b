"""Server reflection under both names clients ask for: grpc.reflection.v1 and v1alpha.

grpcio-reflection serves only v1alpha, while newer clients (grpc-js tools, grpcurl 1.9+,
Postman) ask for v1 first. The two protocols are the same messages under another package, so
v1 is the v1alpha servicer behind a second service name, its descriptor registered beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto to `pool` (made from v1alpha's), once."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(file)
    old_package, file.package, file.name = file.package, "grpc.reflection.v1", _V1_FILE
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages and enums only: assigning sets it
                field.type_name = field.type_name.replace(f".{old_package}.", f".{file.package}.")
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(f".{old_package}.", f".{file.package}.")
        method.output_type = method.output_type.replace(f".{old_package}.", f".{file.package}.")
    pool.Add(file)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection of `service_names` (and of both reflection services) on `server`."""
    _register_v1_descriptor(descriptor_pool.Default())
    names = [*service_names, V1_SERVICE, V1ALPHA_SERVICE]
    servicer = reflection_aio.ReflectionServicer(names)
    handler = {"ServerReflectionInfo": _stream_handler(servicer)}
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(name, handler) for name in (V1ALPHA_SERVICE, V1_SERVICE))
    )


def _stream_handler(servicer: reflection_aio.ReflectionServicer) -> grpc.RpcMethodHandler[object, object]:
    return grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
