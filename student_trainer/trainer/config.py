"""Trainer configuration: typed, loaded from YAML, overridden by ``key=value`` arguments, validated on load.

    livefuse-train --config configs/demo.yaml method.fusion=avg_ce train.max_steps=50
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protos.config_errors import format_errors

# The method names are the keys of the core's registries (ALIGNERS, FUSIONS, SEQUENCE_CE, AVG_WEIGHTS,
# FUSION_LOSSES); spelled out here so reading a config never imports torch, and a test keeps them equal.
AlignerName = Literal["mined", "offsets"]
FusionName = Literal["min_ce", "avg_ce"]
CENormalization = Literal["token", "char"]
AvgWeighting = Literal["paper", "softmax"]
FusionLossName = Literal["ce", "kl"]
FailurePolicy = Literal["wait", "skip", "fail"]
TrackerName = Literal["tensorboard", "wandb", "trackio"]  # the keys of run_log.TRACKERS (a test keeps them equal)
DivergenceName = Literal["forward_kl", "reverse_kl", "jsd"]  # core.losses.DIVERGENCES (a test keeps them equal)
NEEDS_GATHER = ("reverse_kl", "jsd")  # divergences that need each teacher's log-probs at the student's candidates


class ConfigError(ValueError):
    """A setting that cannot work, found when the config is read or when the run starts (a missing file, a
    teacher's limit, too little data): ``livefuse-train`` reports it in one line and exits 2. Any other
    exception is a bug: a traceback and exit 1."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    model: str = Field(description="target model folder or hub id (its initial weights)")
    tokenizer: str | None = Field(None, description="target tokenizer (default: the model's)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype when loading")


class SourceTLS(_Strict):
    ca_cert: str | None = Field(None, description="PEM CA bundle that signed the teacher's certificate (None: system roots)")
    client_cert: str | None = Field(None, description="PEM client certificate for mutual TLS")
    client_key: str | None = Field(None, description="PEM private key of client_cert")
    server_name: str | None = Field(None, description="name to check in the teacher's certificate (default: endpoint host)")

    @model_validator(mode="after")
    def _pair(self) -> SourceTLS:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("tls.client_cert and tls.client_key go together")
        return self


class SourceConfig(_Strict):
    name: str = Field(description="name used in logs and metrics")
    endpoints: list[str] = Field(min_length=1, description="host:port of each replica of this source")
    top_k: int = Field(10, ge=1, description="top-k entries per position requested from the teacher")
    timeout_s: float = Field(120.0, gt=0, description="deadline of one Score call")
    failure: FailurePolicy = Field("wait", description="what to do when the source fails: wait | skip | fail")
    wait_max_s: float = Field(600.0, gt=0, description="policy 'wait': give up after this many seconds")
    texts_per_request: int = Field(16, ge=1, description="texts sent per Score request")
    tls: SourceTLS | None = Field(None, description="TLS settings (absent: plaintext)")
    auth_token_file: str | None = Field(None, description="file holding the teacher's bearer token")

    @field_validator("endpoints")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for e in v:
            host, _, port = e.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"endpoint {e!r} is not host:port")
        return v


class MethodConfig(_Strict):
    aligner: AlignerName = Field("mined", description="token aligner: mined | offsets")
    fusion: FusionName = Field("min_ce", description="fusion: min_ce | avg_ce")
    ce_normalization: CENormalization = Field("token", description="per-sequence CE: token (paper) | char")
    avg_weighting: AvgWeighting = Field("softmax", description="avg_ce weights: paper | softmax (softmax(-CE/tau))")
    avg_tau: float = Field(1.0, gt=0, description="tau of the softmax AvgCE weights")
    lambda_clm: float = Field(0.9, ge=0, le=1, description="λ in λ·CLM + (1−λ)·fusion")
    temperature: float = Field(1.0, gt=0, description="teacher temperature")
    fusion_loss: FusionLossName = Field("ce", description="fusion loss: ce (soft cross-entropy) | kl")


# file extension -> the ``datasets`` builder that reads it (student_trainer.trainer.data.documents)
DATA_FILE_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet"}


class DataConfig(_Strict):
    train_files: list[str] = Field(default_factory=list, description="local .txt / .jsonl / .json / .parquet files")
    validation_files: list[str] = Field(default_factory=list, description="held-out files (else split)")
    dataset: str | None = Field(None, description="a datasets dataset instead of files: hub id, local dataset "
                                "folder or save_to_disk folder")
    dataset_config: str | None = Field(None, description="the dataset's configuration name")
    dataset_revision: str | None = Field(None, description="hub dataset revision (branch, tag or commit)")
    train_split: str = Field("train", description="split of data.dataset to train on")
    validation_split: str | None = Field(None, description="held-out split of data.dataset (else a fraction)")
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="documents held out when no validation data")
    text_field: str = Field("text", description="field holding the text in JSON / parquet / dataset rows")
    seq_len: int = Field(512, ge=8, description="target tokens per training block")
    shuffle_seed: int = Field(0, description="seed of the per-epoch block order")
    min_block_tokens: int = Field(16, ge=2, description="drop trailing blocks shorter than this")
    max_piece_chars: int = Field(1_000_000, ge=1_000, description="longer documents are tokenized in pieces "
                                 "of at most this many characters, cut at line breaks")
    cache_dir: str | None = Field(None, description="where prepared corpora are cached (default: the livefuse "
                                  "cache's data/)")
    num_proc: int = Field(1, ge=1, description="processes that tokenize when a corpus is prepared")
    streaming: bool = Field(False, description="read documents as a stream, tokenized on the fly (no cache)")
    shuffle_buffer: int = Field(10_000, ge=1, description="streaming: documents in the shuffle buffer")

    @field_validator("train_files", "validation_files")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        for path in v:
            if Path(path).suffix.lower() not in DATA_FILE_KINDS:
                raise ValueError(f"data file {path!r} has an unknown extension; accepted: {', '.join(DATA_FILE_KINDS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if bool(self.train_files) == (self.dataset is not None):
            raise ValueError("data: set either train_files (local files) or dataset (a datasets dataset), "
                             "exactly one of them")
        if self.dataset is None and self.validation_split is not None:
            raise ValueError("data.validation_split names a split of data.dataset; with files use "
                             "validation_files")
        if self.dataset is not None and self.validation_files:
            raise ValueError("data.validation_files go with train_files; with data.dataset use validation_split")
        return self


class TrainConfig(_Strict):
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="DeepSpeed config (ZeRO, precision, optimizer, ...)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (else epochs)")
    epochs: float = Field(1.0, gt=0, description="passes over the training blocks when max_steps is unset")
    seed: int = Field(0, description="model / RNG seed")


class RunConfig(_Strict):
    output_dir: str = Field(description="checkpoints, metrics.jsonl, TensorBoard logs and the export go here")
    log_every: int = Field(1, ge=1, description="steps between metric lines")
    summary_every: int = Field(50, ge=0, description="steps between text summaries in the log (0: never)")
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: only at the end)")
    eval_blocks: int = Field(64, ge=1, description="held-out blocks per evaluation")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    prefetch_depth: int = Field(4, ge=1, description="micro-batches fetched and aligned ahead of training")
    export: bool = Field(True, description="save_pretrained the final model + tokenizer to output_dir/final")
    resume: bool = Field(True, description="continue from the latest checkpoint in output_dir if there is one")
    vocab_cache_dir: str | None = Field(None, description="where vocab maps are cached (default: the livefuse cache)")
    connect_timeout_s: float = Field(60.0, gt=0, description="how long to wait for each source at start")
    progress: bool = Field(True, description="show a progress bar")
    report_to: list[TrackerName] = Field(["tensorboard"], description="experiment trackers besides metrics.jsonl "
                                         "(always written): tensorboard | wandb | trackio; [] for none")
    project: str = Field("livefuse", min_length=1, description="project the run is filed under in W&B / trackio")
    run_name: str | None = Field(None, description="run name in the trackers (default: output_dir's folder name)")

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"report_to lists a tracker twice: {v}")
        return v


class OnPolicyConfig(_Strict):
    """On-policy fusion: a share of the micro-batches are the student's own continuations of corpus prompts,
    scored live by every teacher (``student_trainer/trainer/rollouts.py``)."""

    share: float = Field(0.0, ge=0, le=1, description="share of micro-batches that are rollouts (0: none, "
                         "today's training; which ones is a pure function of the micro-batch index)")
    prompt_tokens: int | None = Field(None, ge=1, description="prompt = the first N target tokens of a corpus "
                                      "block (else prompt_fraction of its tokens)")
    prompt_fraction: float = Field(0.5, gt=0, lt=1, description="prompt = this share of a corpus block's tokens "
                                   "when prompt_tokens is unset")
    max_new_tokens: int = Field(64, ge=1, description="tokens the student generates after the prompt (fewer "
                                "when it samples a special token such as EOS)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens with "
                         "this much probability (1: the full distribution)")
    divergence: DivergenceName = Field("forward_kl", description="loss at the continuation's positions: "
                                       "forward_kl | reverse_kl | jsd (the last two need teachers that gather: "
                                       "checked when the run connects to them)")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="β of GKD's generalised JSD (divergence jsd)")
    gather_candidates: int = Field(8, ge=1, le=256, description="reverse_kl / jsd: the student's most likely "
                                   "tokens at each continuation position whose log-probs every teacher is asked for")

    @property
    def gather_ids(self) -> int:
        """The most ids one text asks a teacher to gather (0: this run gathers nothing)."""
        return self.max_new_tokens * self.gather_candidates if self.share > 0 and self.divergence in NEEDS_GATHER \
            else 0

    @model_validator(mode="after")
    def _one_prompt(self) -> OnPolicyConfig:
        if {"prompt_tokens", "prompt_fraction"} <= self.model_fields_set and self.prompt_tokens is not None:
            raise ValueError("on_policy: set prompt_tokens or prompt_fraction, not both")
        return self


class TrainerConfig(_Strict):
    target: ModelConfig
    sources: list[SourceConfig] = Field(default_factory=list, description="source teachers (empty: CLM only)")
    method: MethodConfig = MethodConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    run: RunConfig
    on_policy: OnPolicyConfig = OnPolicyConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> TrainerConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: duplicate names {dupes}; each source needs its own name")
        if self.method.lambda_clm < 1.0 and not self.sources:
            raise ValueError("method.lambda_clm < 1 needs at least one source; set lambda_clm=1 for CLM only")
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError("data.streaming: true needs train.max_steps (a stream has no known length, so "
                             "epochs cannot be counted)")
        return self._on_policy_fits()

    def _on_policy_fits(self) -> TrainerConfig:
        on = self.on_policy
        if on.share > 0 and not self.sources:
            raise ValueError(f"on_policy.share={on.share} needs at least one source: the teachers score the "
                             "rollouts (or set on_policy.share=0)")
        if on.prompt_tokens is not None and on.prompt_tokens >= self.data.seq_len:
            raise ValueError(f"on_policy.prompt_tokens={on.prompt_tokens} must be less than data.seq_len="
                             f"{self.data.seq_len}: the prompt is a prefix of a corpus block")
        return self


def _child(node: Any, part: str, last: bool) -> Any:
    """Steps into ``node[part]``; a list index equal to the length appends a new item."""
    if not isinstance(node, list):
        return node if last else node.setdefault(part, {})
    index = int(part)
    if not 0 <= index <= len(node):
        raise IndexError(f"list index {index} is out of range; the list has {len(node)} item(s)")
    if index == len(node):
        node.append(None if last else {})
    return node if last else node[index]


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][2] = value`` for ``key = "a.b.2"``; ``sources.N=...`` with N = len(sources) appends.

    Hand-written on purpose: OmegaConf's dotlist refuses an index past the end (ConfigIndexError), and
    appending a source from the command line is what users need; this is 15 lines and one dependency less.
    """
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = _child(node, part, last=False)
    node = _child(node, parts[-1], last=True)
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value


def load_trainer_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainerConfig:
    """YAML file, then ``key.sub=value`` overrides (values parsed as YAML), then validation. Reads nothing
    else: whether the data is there is :func:`student_trainer.trainer.inputs.check_inputs`' question
    (a config may be checked for another machine, e.g. a container's)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method.fusion=avg_ce)")
        try:
            _set_dotted(data, key, yaml.safe_load(raw))
        except (IndexError, ValueError, AttributeError, TypeError) as err:
            raise ConfigError(f"override {item!r}: cannot set {key}: {err}") from None
    try:
        config = TrainerConfig(**data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, "invalid trainer config")) from None
    return config
