"""Calling MLX's kernels with mlx-lm's shapes, where the result of a row depends on them.

On the CPU, a row of MLX's matmuls comes out the same whatever else is in its call, so the
engine may cut a prompt where its memory wants. On a GPU it does not: MLX picks a kernel from
the call's shape, and different kernels sum in a different order. Measured on an H100 (MLX
0.32.4, ``moebar-engine selfcheck``): one token's rows of a 4-bit ``gather_qmm`` differed by
2e-7 alone and in a batch of 24, and the engine's first token differed from mlx-lm's on a
40-token prompt. From MLX's CUDA source: ``quantized_matmul`` and ``gather_qmm`` use a
vector kernel when rows x index pairs < 8 and a tiled one otherwise (a row's sum does not
depend on the rest of the call within one kernel); Metal's ``gather_qmm`` switches on the
pairs and on their ratio to the experts in the weight array.

So where rows are not independent, the engine mirrors ``mlx_lm.generate.generate_step``: the
prompt but its last token in steps of ``MLX_LM_PREFILL_STEP`` (attention calls cut at the same
places), then the last token alone; and an expert call split into groups (more experts than
slots) pads a group to the kernel class the whole call would have had (``pad_to``). A pass's
MLP still runs over the whole pass (each routed expert read once), on the premise that within
one kernel a row's sum does not depend on the call's length; a short last step (under 8
tokens, where mlx-lm took the vector kernel) gets its own call (``short_step_tail``). Unmeasured
on a GPU: ``bench/gpu/check_long_prefill.py`` (2,100 tokens: a pass of 2,099 against mlx-lm's
2,048 + 51) is the check.

Limits: ``--prefill-matmul on`` on a GPU runs each expert's rows as a ``quantized_matmul``, not
mlx-lm's ``gather_qmm``, so its tokens may differ. On Metal the last token alone and the attention
cuts apply, but ``gather_qmm`` there also chooses by the ratio of pairs to the experts in the
weight array (the engine's slot pool, not the model's experts), which ``pad_to`` does not follow:
the self-check's exactness check says whether a Mac gives mlx-lm's tokens.
"""

from __future__ import annotations

from engine.errors import RequestError

MLX_LM_PREFILL_STEP = 2048  # generate_step's prefill_step_size default (mlx-lm 0.32)
CUDA_VECTOR_PAIRS = 8  # rows x index pairs below which MLX's CUDA (gather_)qmm takes its vector kernel


def rows_independent(backend: str) -> bool:
    """Whether a row's result is the same whatever else is in its call (MLX's CPU kernels)."""
    return backend == "cpu"


def mirror_setting(setting: str, backend: str) -> bool:
    """The ``mlx_lm_shapes`` option ("auto", "on", "off") resolved for ``backend``."""
    if setting not in ("auto", "on", "off"):
        raise RequestError(f"mlx_lm_shapes must be 'auto', 'on' or 'off', got {setting!r}")
    return setting == "on" or (setting == "auto" and not rows_independent(backend))


def aligned_pass_tokens(pass_tokens: int) -> int:
    """A pass length whose attention calls can end where mlx-lm's steps end.

    At least one step: a pass shorter than mlx-lm's step would cut a step's attention in two.
    """
    if pass_tokens <= MLX_LM_PREFILL_STEP:
        return MLX_LM_PREFILL_STEP
    return pass_tokens // MLX_LM_PREFILL_STEP * MLX_LM_PREFILL_STEP


def short_step_tail(pass_len: int) -> int:
    """Tokens at the end of a pass (cut at mlx-lm's steps) whose MLP must run in its own call.

    A pass's MLP runs over all its tokens at once (one read per routed expert). Where mlx-lm's
    last step is shorter than CUDA_VECTOR_PAIRS tokens, its dense projections took the vector
    kernel, which a call over the whole pass would not: those tokens get a call of their own.
    0 when the pass ends on a step of CUDA_VECTOR_PAIRS tokens or more.
    """
    tail = pass_len % MLX_LM_PREFILL_STEP
    return tail if 0 < tail < CUDA_VECTOR_PAIRS and tail < pass_len else 0


def pad_to(group_pairs: int, call_pairs: int, backend: str) -> int:
    """Pairs a group of a split expert call is padded to, to run the kernel the whole call would.

    ``call_pairs``: the (token, expert) pairs of the unsplit call (mlx-lm's call). On CUDA the
    tiled kernel runs from CUDA_VECTOR_PAIRS pairs up; a smaller group of a larger call is padded
    to that many. Elsewhere (and where no padding is needed) ``group_pairs``.
    """
    if backend == "cuda" and call_pairs >= CUDA_VECTOR_PAIRS > group_pairs:
        return CUDA_VECTOR_PAIRS
    return group_pairs
