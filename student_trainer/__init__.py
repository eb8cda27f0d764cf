"""livefuse's trainer side, in three layers (each may import only the ones above it; import-linter checks):

- ``core``: the pure FuseLLM maths — vocabulary map, aligners, fusion, losses (numpy, torch, rapidfuzz; no
  gRPC, no config, no I/O);
- ``trainer``: the training run — config, data, sources (gRPC clients), prefetch, the loop, checkpoints,
  evaluation, logging (``livefuse-train``);
- ``demo``: the README's main job — assets, corpus, tiny models, teacher processes, the report.
"""
