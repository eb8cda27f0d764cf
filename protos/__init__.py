"""The contract between teachers and trainers: what both sides must agree on, and nothing else.

- ``teacher.proto`` (the only definition of the wire format) and its generated stubs ``teacher_pb2*``;
- ``codec``: packed little-endian arrays; ``scores``: one scored text <-> its ``ScoredText`` message;
- ``errors``: the reasons a teacher gives where a status code is ambiguous (gRPC's rich error model);
- ``vocabulary``: the tokenizer fingerprint, the raw-vocabulary rules and the token-string conventions
  (``TeacherInfo.vocab_encoding``) both sides compute; pure standard library, so the trainer's core may
  import it;
- ``logs`` and ``config_errors``: not wire format, but shared by both CLIs (the JSON log line format a
  process launcher reads, and the one-line-per-field config error). They live here because
  ``teacher_server`` and ``student_trainer`` may not import each other (see the import-linter contracts
  in pyproject.toml).
"""
