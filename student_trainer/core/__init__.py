"""The pure FuseLLM core: arrays in, arrays out. ``vocab`` (MinED vocabulary map), ``alignment`` (MinED and
offset aligners), ``fusion`` (MinCE, AvgCE), ``losses`` (sparse λ·CLM + (1−λ)·fusion). Imports nothing of
the trainer, no gRPC, no config objects, no I/O."""
