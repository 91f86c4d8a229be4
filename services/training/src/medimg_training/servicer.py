"""The gRPC face of inference. Datasets and training jobs arrive with its own issue: until then
every method answers UNIMPLEMENTED (the generated base servicer's behaviour, mapped by the
core interceptor), after the caller's permission is checked."""

from __future__ import annotations

from medimg.training.v1 import training_service_pb2_grpc as pb_grpc

from medimg_core.identity import Role

_USERS = frozenset({Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {"ListTrainingJobs": _USERS, "GetTrainingJob": _USERS}


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    pass
