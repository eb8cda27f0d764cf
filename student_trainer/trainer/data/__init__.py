"""The corpus, from documents to the micro-batches a rank trains on.

- ``documents``: where text comes from — local files, a ``datasets`` dataset (hub id, local folder,
  ``save_to_disk`` folder) — and whether it is there (``check_data``, run by the CLI, not by the config);
- ``blocks``: the pure parts — documents cut into pieces and target-token blocks that carry their text, the
  seeded per-rank sampler, collate, the target tokenizer;
- ``prepared``: the prepared corpus, tokenized once into an on-disk cache every rank reads block by block
  (``livefuse-train prepare``), and ``build``, which writes it;
- ``stream``: ``data.streaming: true``, documents tokenized on the fly.
"""
