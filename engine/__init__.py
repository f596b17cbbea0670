"""MoeBar engine: streams the routed experts of MoE models from the SSD (no Qt here)."""

from engine.fast_blas import load_fast_blas

# Before anything imports mlx.core: MLX's CPU matmuls then run on a fast BLAS (see fast_blas).
load_fast_blas()
