from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    D_TYPE_UNSPECIFIED: _ClassVar[DType]
    D_TYPE_UINT8: _ClassVar[DType]
    D_TYPE_UINT16: _ClassVar[DType]
    D_TYPE_UINT32: _ClassVar[DType]
    D_TYPE_INT32: _ClassVar[DType]
    D_TYPE_INT64: _ClassVar[DType]
    D_TYPE_FLOAT16: _ClassVar[DType]
    D_TYPE_FLOAT32: _ClassVar[DType]

class VocabEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOCAB_ENCODING_UNSPECIFIED: _ClassVar[VocabEncoding]
    VOCAB_ENCODING_PLAIN: _ClassVar[VocabEncoding]
    VOCAB_ENCODING_SENTENCEPIECE: _ClassVar[VocabEncoding]
    VOCAB_ENCODING_BYTE_LEVEL: _ClassVar[VocabEncoding]

class LogprobFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGPROB_FORMAT_UNSPECIFIED: _ClassVar[LogprobFormat]
    LOGPROB_FORMAT_FLOAT16: _ClassVar[LogprobFormat]
    LOGPROB_FORMAT_FLOAT32: _ClassVar[LogprobFormat]
D_TYPE_UNSPECIFIED: DType
D_TYPE_UINT8: DType
D_TYPE_UINT16: DType
D_TYPE_UINT32: DType
D_TYPE_INT32: DType
D_TYPE_INT64: DType
D_TYPE_FLOAT16: DType
D_TYPE_FLOAT32: DType
VOCAB_ENCODING_UNSPECIFIED: VocabEncoding
VOCAB_ENCODING_PLAIN: VocabEncoding
VOCAB_ENCODING_SENTENCEPIECE: VocabEncoding
VOCAB_ENCODING_BYTE_LEVEL: VocabEncoding
LOGPROB_FORMAT_UNSPECIFIED: LogprobFormat
LOGPROB_FORMAT_FLOAT16: LogprobFormat
LOGPROB_FORMAT_FLOAT32: LogprobFormat

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("model_name", "architecture", "tokenizer_fingerprint", "vocab_size", "tokenizer_size", "special_token_ids", "max_top_k", "max_texts_per_request", "max_tokens_per_text", "max_tokens_per_request", "max_message_bytes", "dtype", "device", "backend", "add_bos", "server_version", "default_top_k", "vocab_encoding", "vocab_byte_fallback", "max_gather_ids")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    VOCAB_ENCODING_FIELD_NUMBER: _ClassVar[int]
    VOCAB_BYTE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    MAX_GATHER_IDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    architecture: str
    tokenizer_fingerprint: str
    vocab_size: int
    tokenizer_size: int
    special_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_top_k: int
    max_texts_per_request: int
    max_tokens_per_text: int
    max_tokens_per_request: int
    max_message_bytes: int
    dtype: str
    device: str
    backend: str
    add_bos: bool
    server_version: str
    default_top_k: int
    vocab_encoding: VocabEncoding
    vocab_byte_fallback: bool
    max_gather_ids: int
    def __init__(self, model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_size: _Optional[int] = ..., special_token_ids: _Optional[_Iterable[int]] = ..., max_top_k: _Optional[int] = ..., max_texts_per_request: _Optional[int] = ..., max_tokens_per_text: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., add_bos: _Optional[bool] = ..., server_version: _Optional[str] = ..., default_top_k: _Optional[int] = ..., vocab_encoding: _Optional[_Union[VocabEncoding, str]] = ..., vocab_byte_fallback: _Optional[bool] = ..., max_gather_ids: _Optional[int] = ...) -> None: ...

class GetVocabRequest(_message.Message):
    __slots__ = ("chunk_size",)
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_size: int
    def __init__(self, chunk_size: _Optional[int] = ...) -> None: ...

class VocabChunk(_message.Message):
    __slots__ = ("start_id", "tokens")
    START_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    start_id: int
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, start_id: _Optional[int] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("texts", "top_k", "truncate", "logprob_format", "request_id", "gather")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FORMAT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    truncate: bool
    logprob_format: LogprobFormat
    request_id: str
    gather: _containers.RepeatedCompositeFieldContainer[GatherSpec]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., truncate: _Optional[bool] = ..., logprob_format: _Optional[_Union[LogprobFormat, str]] = ..., request_id: _Optional[str] = ..., gather: _Optional[_Iterable[_Union[GatherSpec, _Mapping]]] = ...) -> None: ...

class GatherSpec(_message.Message):
    __slots__ = ("ends", "ids")
    ENDS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ends: Array
    ids: Array
    def __init__(self, ends: _Optional[_Union[Array, _Mapping]] = ..., ids: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class ScoredText(_message.Message):
    __slots__ = ("input_ids", "offsets", "topk_ids", "topk_logprobs", "next_logprobs", "truncated", "gathered_logprobs")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    GATHERED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    input_ids: Array
    offsets: Array
    topk_ids: Array
    topk_logprobs: Array
    next_logprobs: Array
    truncated: bool
    gathered_logprobs: Array
    def __init__(self, input_ids: _Optional[_Union[Array, _Mapping]] = ..., offsets: _Optional[_Union[Array, _Mapping]] = ..., topk_ids: _Optional[_Union[Array, _Mapping]] = ..., topk_logprobs: _Optional[_Union[Array, _Mapping]] = ..., next_logprobs: _Optional[_Union[Array, _Mapping]] = ..., truncated: _Optional[bool] = ..., gathered_logprobs: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class ErrorStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "results", "error", "tokenizer_fingerprint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[ScoredText]
    error: ErrorStatus
    tokenizer_fingerprint: str
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ScoredText, _Mapping]]] = ..., error: _Optional[_Union[ErrorStatus, _Mapping]] = ..., tokenizer_fingerprint: _Optional[str] = ...) -> None: ...
