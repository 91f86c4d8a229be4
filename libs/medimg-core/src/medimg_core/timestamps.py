"""Conversions between datetimes and protobuf Timestamps."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2


def to_proto(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
