"""How many parameters a recipe's model has (Ψ), for the planner's memory estimate.

The built-in models are counted in closed form from their kwargs and the data's facts,
without torch, so that `dlaunch plan` stays fast; tests check each formula against the
built model. A ``model.target`` model is the user's code: ``count_on_meta`` builds it on
the meta device (no memory, no initialisation), importing torch only then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.data.facts import DataFacts
    from launcher.recipe import ModelConfig

# The built-ins' keyword defaults, as in launcher/models/{mlp,cnn,gpt}.py (imported there
# with torch, so written out here; the tests build each model and compare).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (256, 256), "dropout": 0.0},
    "cnn": {"channels": (32, 64), "blocks_per_stage": 1, "dropout": 0.0},
    "gpt": {"n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0},
}


class _Uncountable(Exception):
    """Kwargs the model itself would refuse: left to ``build_model``, which says why."""


def _size(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Uncountable
    return value


def _sizes(value: Any, minimum: int) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _Uncountable
    return [_size(v, minimum) for v in value]


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _mlp(input_shape: Sequence[int], num_classes: int, hidden: Any, dropout: Any) -> int:
    width, total = math.prod(input_shape), 0
    for size in _sizes(hidden, 0):
        total += _linear(width, size)
        width = size
    return total + _linear(width, num_classes)


def _conv_norm(c_in: int, c_out: int, kernel: int) -> int:
    # A bias-free convolution, then GroupNorm's weight and bias (launcher/models/cnn.py).
    if c_out >= 8 and c_out % 8:
        raise _Uncountable  # GroupNorm(8, c_out) needs c_out divisible by 8
    return c_in * c_out * kernel * kernel + 2 * c_out


def _cnn(input_shape: Sequence[int], num_classes: int, channels: Any, blocks_per_stage: Any,
         dropout: Any) -> int:
    stages, blocks = _sizes(channels, 1), _size(blocks_per_stage, 1)
    if len(input_shape) != 3 or not stages:
        raise _Uncountable
    total = _conv_norm(input_shape[0], stages[0], 3)  # the stem
    width = stages[0]
    for stage, out in enumerate(stages):
        # A stage's first block takes the width (and stride) from the one before, with a
        # projection shortcut where either changes; the rest map out to out.
        total += _conv_norm(width, out, 3) + _conv_norm(out, out, 3)
        if stage > 0 or width != out:
            total += _conv_norm(width, out, 1)
        total += (blocks - 1) * 2 * _conv_norm(out, out, 3)
        width = out
    return total + _linear(width, num_classes)


def _gpt(input_shape: Sequence[int], num_classes: int, n_layer: Any, n_head: Any, n_embd: Any,
         dropout: Any) -> int:
    layers, heads, embd = _size(n_layer, 0), _size(n_head, 1), _size(n_embd, 1)
    if len(input_shape) != 1 or embd % heads:
        raise _Uncountable
    block = (2 * 2 * embd                       # ln_1, ln_2
             + _linear(embd, 3 * embd) + _linear(embd, embd)  # attention: c_attn, c_proj
             + _linear(embd, 4 * embd) + _linear(4 * embd, embd))  # the MLP
    # Token and position embeddings, the blocks, ln_f; lm_head shares wte's weight.
    return num_classes * embd + input_shape[0] * embd + layers * block + 2 * embd


_FORMULAS = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt}


def builtin_params(cfg: ModelConfig, data: DataFacts) -> int | None:
    """Ψ of the built-in model ``cfg.name`` sized for ``data``: what
    ``sum(p.numel() for p in build_model(cfg, data).parameters())`` gives (a tied weight
    once). None for kwargs the model would refuse (unknown, of the wrong type, out of
    range): building it reports those."""
    defaults = _DEFAULTS[cfg.name]
    if set(cfg.kwargs) - set(defaults):
        return None
    try:
        return _FORMULAS[cfg.name](data.input_shape, data.num_classes, **{**defaults, **cfg.kwargs})
    except _Uncountable:
        return None


def count_on_meta(cfg: ModelConfig, data: DataFacts) -> int:
    """Ψ of the recipe's model, built on the meta device: shapes without storage. Raises
    whatever building it raises (the user's factory may move tensors or read files)."""
    import torch

    from launcher.models.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, data)
    return sum(p.numel() for p in model.parameters())
