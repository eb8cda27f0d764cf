"""The trainer's side of each source: one channel over its replicas, its vocabulary mapped into the
target's once, and the failure policy (wait / skip / fail) around every fetch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from protos import teacher_pb2 as pb
from student_trainer.core.alignment import TeacherOutput, Tokens, VocabPair, make_vocab_pair
from student_trainer.core.vocab import counterpart_map
from student_trainer.trainer.client import (
    ClientTLS,
    FingerprintMismatch,
    GatherArrays,
    ResponseTooLarge,
    TeacherClient,
)
from student_trainer.trainer.config import ConfigError, SourceConfig
from student_trainer.trainer.vocab_cache import cached_vocab_map

log = logging.getLogger("livefuse.trainer.sources")
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


class SourceFailed(RuntimeError):
    """A source is down and its policy says stop (``fail``, or ``wait`` past ``wait_max_s``)."""


class SourceChanged(RuntimeError):
    """A source came back serving another tokenizer: its outputs would be garbage in the cached mapping."""


class Source:
    """One source: a client over its replicas, its vocabulary pair, the failure policy. ``connect`` builds it."""

    def __init__(self, config: SourceConfig, client: TeacherClient, info: pb.TeacherInfo, pair: VocabPair,
                 counterparts: np.ndarray | None = None) -> None:
        self.config, self.name = config, config.name
        self.client, self.info, self.pair = client, info, pair
        self.counterparts = counterparts  # target id -> this source's exact id or -1 (when gathering: on-policy)
        self._broken_since: float | None = None  # shared by the prefetch threads: read and written under _lock
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @classmethod
    def connect(cls, config: SourceConfig, target_vocab: Sequence[str], target_fingerprint: str,
                cache_dir: Path, connect_timeout: float = 60.0, gather_ids: int = 0) -> Source:
        """Connects to the teacher, checks its limits and maps its vocabulary into the target's (cached).

        ``gather_ids``: the most ids one of this run's requests will ask the teacher to gather (on-policy
        reverse KL / JSD; 0: none) — refused here when the teacher cannot gather that many."""
        # under "skip" a dead source should cost little per batch: one gRPC-level retry, then skip
        attempts = 2 if config.failure == "skip" else 5
        tls = ClientTLS(**config.tls.model_dump()) if config.tls is not None else None
        token = Path(config.auth_token_file).read_text().strip() if config.auth_token_file else None
        client = TeacherClient(config.endpoints, timeout=config.timeout_s, max_attempts=attempts, tls=tls, token=token)
        try:
            info = client.info(timeout=connect_timeout)
            vocab = client.vocab(timeout=max(connect_timeout, config.timeout_s))
        except grpc.RpcError as err:
            client.close()
            raise SourceFailed(f"source {config.name!r} at {', '.join(config.endpoints)} is not reachable "
                               f"({err.code().name}: {err.details()}); is the teacher running?") from None
        if config.top_k > info.max_top_k:
            client.close()
            raise ConfigError(f"sources[{config.name}].top_k={config.top_k} exceeds the teacher's "
                             f"max_top_k={info.max_top_k}")
        if gather_ids > info.max_gather_ids:
            client.close()
            raise ConfigError(_cannot_gather(config, info, gather_ids))
        vmap = cached_vocab_map(vocab, target_vocab, info.tokenizer_fingerprint, target_fingerprint, cache_dir)
        counterparts = counterpart_map(vocab, target_vocab) if gather_ids else None
        return cls(config, client, info, make_vocab_pair(vocab, target_vocab, vmap), counterparts)

    def close(self) -> None:
        """Closes the channel: in-flight and later fetches end with SourceFailed instead of retrying."""
        self._closed.set()
        self.client.close()

    def _score(self, texts: Sequence[str], gather: Sequence[GatherArrays] | None) -> list[TeacherOutput]:
        n = self.config.texts_per_request
        out: list[TeacherOutput] = []
        for s in range(0, len(texts), n):
            for r in self.client.score(texts[s:s + n], top_k=self.config.top_k, truncate=True,
                                       expect_fingerprint=self.info.tokenizer_fingerprint,
                                       gather=None if gather is None else gather[s:s + n]):
                tokens = Tokens(r.input_ids.astype(np.int64), r.offsets.astype(np.int64))
                gathered = None if r.gathered_logprobs is None else r.gathered_logprobs.astype(np.float32)
                out.append(TeacherOutput(tokens, r.topk_ids.astype(np.int64), r.topk_logprobs.astype(np.float32),
                                         r.next_logprobs.astype(np.float32), gathered))
        return out

    def fetch(self, texts: Sequence[str], gather: Sequence[GatherArrays] | None = None) -> list[TeacherOutput] | None:
        """Teacher outputs for ``texts``; None when the source is down and its policy is ``skip``. ``gather``: one
        ``(ends (m,), ids (m, c))`` per text, this teacher's ids (see ``TeacherClient.score``)."""
        backoff = 0.5
        while True:
            if self._closed.is_set():
                raise SourceFailed(f"source {self.name!r} was closed")
            try:
                result = self._score(texts, gather)
                with self._lock:
                    was_broken, self._broken_since = self._broken_since is not None, None
                if was_broken:
                    log.warning("source back", extra={"fields": {"source": self.name}})
                return result
            except FingerprintMismatch as err:  # checked on every response, retries or not
                raise SourceChanged(
                    f"source {self.name!r} came back with tokenizer {err.got} (it was {err.expected}). "
                    "Restart the run with the right teacher, or give the source a new name") from None
            except ResponseTooLarge as err:  # the same request can never fit: no retry, no skip
                raise SourceFailed(self._too_large(err)) from None
            except grpc.RpcError as err:
                if self._closed.is_set():
                    raise SourceFailed(f"source {self.name!r} was closed") from None
                if err.code() not in TRANSIENT:
                    raise SourceFailed(f"source {self.name!r} refused a request: {err.code().name}: "
                                       f"{err.details()}") from None
                backoff = self._on_failure(err, backoff)
                if backoff < 0:
                    return None

    def _too_large(self, err: ResponseTooLarge) -> str:
        name = self.name
        over = (f"of up to {err.response_bytes} bytes, over the teacher's max_message_bytes={err.max_message_bytes}"
                if err.response_bytes and err.max_message_bytes else f"over the teacher's max_message_bytes ({err})")
        return (f"source {name!r}: a request of sources[{name}].texts_per_request={self.config.texts_per_request} "
                f"texts at sources[{name}].top_k={self.config.top_k} gets a response {over} (RESPONSE_TOO_LARGE); "
                f"no retry can help: lower sources[{name}].texts_per_request or sources[{name}].top_k, or raise the "
                "teacher's max_message_bytes")

    def _on_failure(self, err: grpc.RpcError, backoff: float) -> float:
        """Applies the policy; returns the next backoff, or -1 to skip."""
        now = time.monotonic()
        with self._lock:  # another thread's success may reset the mark at any moment: keep this thread's view
            first = self._broken_since is None
            if first:
                self._broken_since = now
            broken_since = self._broken_since
        if first:
            log.warning("source failing", extra={"fields": {"source": self.name, "code": err.code().name,
                                                            "details": err.details(),
                                                            "policy": self.config.failure}})
        what = f"source {self.name!r} failed: {err.code().name}: {err.details()}"
        if self.config.failure == "fail":
            raise SourceFailed(what)
        if self.config.failure == "skip":  # counted per sequence in the step metrics (skipped/<name>)
            return -1
        if now - broken_since > self.config.wait_max_s:
            raise SourceFailed(f"{what}; it did not come back within wait_max_s={self.config.wait_max_s}")
        self._closed.wait(backoff)  # close() ends the wait
        return min(backoff * 2, 10.0)


def _cannot_gather(config: SourceConfig, info: pb.TeacherInfo, asked: int) -> str:
    what = (f"cannot gather (backend {info.backend}: TeacherInfo.max_gather_ids = 0)" if not info.max_gather_ids else
            f"gathers at most {info.max_gather_ids} ids per request")
    return (f"source {config.name!r} {what}, and on_policy.divergence needs up to {asked} per request "
            f"(sources[{config.name}].texts_per_request × on_policy.max_new_tokens × on_policy.gather_candidates): "
            "reverse_kl and jsd need each teacher's log-probs at the student's candidate tokens. Use "
            "on_policy.divergence=forward_kl, fewer texts_per_request or gather_candidates, or a teacher that "
            "gathers (the HF backend; raise its --max-gather-ids)")
