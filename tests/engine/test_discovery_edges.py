"""Expert-bank discovery edges (engine/model/discovery.py): a model without expert banks has
nothing to stream, and probing a model leaves mlx-lm's classes as they were, including a family's
bank subclass that only inherits ``__call__`` (so a later, unstreamed model is not affected)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

from engine.model.discovery import probe_banks


def test_a_model_without_expert_banks_has_nothing_to_stream() -> None:
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.mlp = nn.Linear(8, 8)

        def __call__(self, tokens: mx.array, cache: object = None) -> mx.array:
            return self.mlp(self.embed(tokens))

    assert probe_banks(Dense(), "dense") == []


class FamilySwitch(SwitchGLU):
    """A family's own bank class that adds nothing to SwitchGLU's call (inherits ``__call__``)."""


def test_probing_restores_the_classes_it_patched() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 6)
            self.bank = FamilySwitch(8, 4, 6)
            self.spare = SwitchLinear(8, 8, 2)  # makes the block an owner; its call has no indices

        def __call__(self, x: mx.array) -> mx.array:
            chosen = mx.argpartition(self.router(x), kth=-2, axis=-1)[..., -2:]
            return x + self.bank(x, chosen).sum(axis=-2)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.block = Block()

        def __call__(self, tokens: mx.array, cache: object = None) -> mx.array:
            return self.block(self.embed(tokens))

    switch_call, linear_call = SwitchGLU.__dict__["__call__"], SwitchLinear.__dict__["__call__"]
    banks = probe_banks(Toy(), "toy")
    assert [(b.path, b.k) for b in banks] == [("block.bank", 2)]
    assert "__call__" not in FamilySwitch.__dict__  # the inherited call is back, not a leftover patch
    assert SwitchGLU.__dict__["__call__"] is switch_call and SwitchLinear.__dict__["__call__"] is linear_call
