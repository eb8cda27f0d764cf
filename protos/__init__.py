"""livefuse wire format: generated gRPC stubs for ``teacher.proto`` and the packed-array codec."""
