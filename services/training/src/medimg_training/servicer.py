"""The gRPC face of training.

Datasets, jobs and the registry come with the training issue: until then each method
answers UNIMPLEMENTED, after the caller's permission has been checked like any other call.
"""

from __future__ import annotations

from medimg.training.v1 import training_service_pb2 as pb
from medimg.training.v1 import training_service_pb2_grpc as pb_grpc
from medimg_core.calls import Context
from medimg_core.errors import Unimplemented
from medimg_core.identity import Role

_USERS = frozenset({Role("researcher"), Role("ml-engineer"), Role("admin")})
POLICY = {"ListTrainingJobs": _USERS, "GetTrainingJob": _USERS}


def _not_yet(what: str) -> Unimplemented:
    return Unimplemented("NOT_IMPLEMENTED", f"{what} is not implemented yet: no training jobs")


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: Context
    ) -> pb.ListTrainingJobsResponse:
        raise _not_yet("ListTrainingJobs")

    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        raise _not_yet("GetTrainingJob")
