"""The training run (``livefuse-train``): ``config`` → ``data`` (blocks and their text) → ``sources`` (one gRPC
client per teacher, failure policy) → ``prefetch`` (fetch, align, fuse off the training thread) → ``loop``
(the step) with ``checkpoint``, ``evaluation`` and ``run_log``. Imports the core and protos, never the server."""
