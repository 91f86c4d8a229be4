"""The gRPC face of inference.

The model repository comes with the inference issue: until then each method answers
UNIMPLEMENTED, after the caller's permission has been checked like any other call.
"""

from __future__ import annotations

from medimg.inference.v1 import inference_service_pb2 as pb
from medimg.inference.v1 import inference_service_pb2_grpc as pb_grpc
from medimg_core.calls import Context
from medimg_core.errors import Unimplemented
from medimg_core.identity import Role

_USERS = frozenset({Role("clinician"), Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {"ListModels": _USERS, "GetModel": _USERS}


def _not_yet(what: str) -> Unimplemented:
    return Unimplemented("NOT_IMPLEMENTED", f"{what} is not implemented yet: no model repository")


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        raise _not_yet("ListModels")

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.Model:
        raise _not_yet("GetModel")
