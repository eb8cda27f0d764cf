"""Why a teacher refused, where a status code alone is ambiguous: gRPC's standard rich error model, a
``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer whose details hold a
``google.rpc.ErrorInfo`` with ``domain`` "livefuse.v1" and a ``reason`` below (teacher.proto's header is the
reference for clients in other languages). Defined once, here: the teacher sets it, the trainer reads it.

- ``RESPONSE_TOO_LARGE`` (``RESOURCE_EXHAUSTED``): the response to this request could exceed the teacher's
  ``max_message_bytes`` (metadata ``max_message_bytes``, ``response_bytes``). The same request can never
  succeed: send fewer tokens per request or a smaller top_k. A ``RESOURCE_EXHAUSTED`` without a reason is
  "busy, retry later" (a full queue) or the transport's own message-size check.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from protos import teacher_pb2 as pb

ERROR_DOMAIN: str = pb.DESCRIPTOR.package
RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"


def rich_status(code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str]) -> grpc.Status:
    """The status to end a call with: ``code`` and ``message``, and an ErrorInfo naming ``reason`` in its
    ``grpc-status-details-bin`` trailer."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return rpc_status.to_status(status)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The livefuse ErrorInfo a failed call carries; None without one (or with a trailer that contradicts
    the call's own status)."""
    if not isinstance(err, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None
