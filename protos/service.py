"""The teacher service's full name (``livefuse.v1.Teacher``), read from the proto: what health checks ask
about, what clients' retry policy names, the prefix of every RPC path. Defined once, here."""

from __future__ import annotations

from protos import teacher_pb2 as pb

TEACHER_SERVICE: str = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
