"""Typed errors with messages a user can act on: which file, field, layer or expert, and what to do."""

from __future__ import annotations


class MoeBarError(Exception):
    """Base class of every error the engine reports to a user (CLI, protocol, app)."""

    code = "engine_error"


class ModelError(MoeBarError):
    """The model directory cannot be used (missing file, bad config, unsupported layout)."""

    code = "model_error"


class MissingFileError(ModelError):
    """A file the model needs is absent (a shard listed in the index, config.json, tokenizer)."""

    code = "missing_file"


class CorruptModelError(ModelError):
    """A model file is present but its bytes are wrong (truncated, bad header, bad checksum)."""

    code = "corrupt_model"


class UnsupportedModelError(ModelError):
    """The model's architecture is unknown to mlx-lm or has no streamable MoE layers."""

    code = "unsupported_model"


class TokenizerError(ModelError):
    """The tokenizer files are absent, empty or unusable."""

    code = "tokenizer_error"


class ExpertReadError(MoeBarError):
    """An expert could not be read from disk (I/O error, short read, checksum mismatch)."""

    code = "expert_read_error"


class DiskFullError(MoeBarError):
    """Not enough free space to write (pack); says how much is needed."""

    code = "disk_full"


class RequestError(MoeBarError):
    """A request is malformed or not allowed in the current state."""

    code = "bad_request"
