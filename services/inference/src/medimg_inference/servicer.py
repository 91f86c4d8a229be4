"""The gRPC face of inference. The model repository arrives with its own issue: until then
every method answers UNIMPLEMENTED (the generated base servicer's behaviour, mapped by the
core interceptor), after the caller's permission is checked."""

from __future__ import annotations

from medimg.inference.v1 import inference_service_pb2_grpc as pb_grpc

from medimg_core.identity import Role

_USERS = frozenset({Role("clinician"), Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {"ListModels": _USERS, "GetModel": _USERS}


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    pass
