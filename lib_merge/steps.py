"""What one output key computes: the recipe tree, specialised to that key.

``Tree`` is a recipe node bound to open inputs: each model is a role (A, B, C ...) and each
parameter is checked once. ``Tree.step(key)`` applies the built-in's key rules at every node and
returns a role (the key is copied from that input), a ``Step`` (a method over roles and nested
steps, with this key's parameter values) or None (the node's primary input lacks the key).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import blocks
from .channels import channel_merge
from .errors import IncompatibleModelsError, MergeError
from .io.readers import CheckpointReader
from .methods import Method

# The built-in never merges this key (modules/extras.py, checkpoint_dict_skip_on_merge).
SKIP_ON_MERGE = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@dataclass(frozen=True)
class Step:
    """A method at one key: its arguments (a role, a nested Step, or None for a missing optional)."""

    method: Method
    args: tuple[str | Step | None, ...]
    params: dict  # the function's keyword arguments, as they are at this key
    shape: tuple[int, ...]
    dtype: torch.dtype  # type promotion of the inputs taking part
    variant: str | None = None  # merge only the first 4 input channels of the primary (inpainting / pix2pix)

    def roles(self) -> Iterator[str]:
        """The inputs read for this step, depth first."""
        for arg in self.args:
            if isinstance(arg, Step):
                yield from arg.roles()
            elif arg is not None:
                yield arg

    @property
    def flat(self) -> bool:
        """Elementwise over plain inputs: the engine may feed it slices instead of whole tensors."""
        return self.method.elementwise and self.variant is None and not any(isinstance(a, Step) for a in self.args)


@dataclass
class Tree:
    """A recipe node with its models bound to roles and its parameters checked."""

    method: Method
    inputs: list[str | Tree]
    params: dict  # by parameter name
    blocks: dict[str, blocks.BlockValues]
    # The built-in merges only keys with "model" in the name, which in an SD checkpoint keeps A's
    # schedule buffers (betas, alphas_cumprod ...). Flux and SD3 files have none: there the rule
    # would skip every key of a bare transformer, T5's and the vae.* keys, so they merge every key.
    model_keys_only: bool = True

    def step(self, key: str, readers: dict[str, CheckpointReader], problems: list[MergeError]) -> str | Step | None:
        args = [self._arg(item, key, readers, problems) for item in self.inputs]
        primary = args[0]
        if primary is None:
            return None
        if (self.model_keys_only and "model" not in key) or key == SKIP_ON_MERGE:
            return primary
        if any(arg is None and self._input_name(i) not in self.method.optional for i, arg in enumerate(args)):
            return primary  # the built-in merges only keys that B (here: every required input) has
        shape = _shape(primary, key, readers)
        variant = self._check_shapes(key, args, readers, problems)
        dtypes = [_dtype(arg, key, readers) for arg in args if arg is not None]
        dtype = dtypes[0] if variant else _promote(dtypes)
        return Step(self.method, tuple(args), self._params_at(key), shape, dtype, variant)

    def _arg(self, item, key, readers, problems):
        if isinstance(item, Tree):
            return item.step(key, readers, problems)
        return item if key in readers[item] else None

    def _input_name(self, index: int) -> str:
        return self.method.inputs[min(index, len(self.method.inputs) - 1)]

    def _check_shapes(self, key, args, readers, problems) -> str | None:
        """The inpainting / pix2pix variant, or None; a mismatch is recorded as a problem."""
        shapes = [(_label(arg), _shape(arg, key, readers)) for arg in args if arg is not None]
        (_, primary), others = shapes[0], shapes[1:]
        variant = None
        try:
            for _, shape in others[:1]:
                variant = channel_merge(key, primary, shape)
        except IncompatibleModelsError as err:
            problems.append(err)
            return None
        first_label, first_shape = others[0] if others else ("", primary)
        for label, shape in others[1:]:
            if shape != first_shape:
                problems.append(
                    IncompatibleModelsError(
                        f"shape mismatch at key {key}: {first_label} has {list(first_shape)}, {label} has {list(shape)}"
                    )
                )
                break
        return variant

    def _params_at(self, key: str) -> dict:
        return {
            param.arg: self.blocks[name].value_for(key) if name in self.blocks else self.params[name]
            for name, param in self.method.params.items()
        }


def _label(arg: str | Step) -> str:
    return arg if isinstance(arg, str) else f"the {arg.method.label} of {', '.join(dict.fromkeys(arg.roles()))}"


def _shape(arg: str | Step, key: str, readers) -> tuple[int, ...]:
    return tuple(readers[arg].spec(key).shape) if isinstance(arg, str) else arg.shape


def _dtype(arg: str | Step, key: str, readers) -> torch.dtype:
    return readers[arg].spec(key).dtype if isinstance(arg, str) else arg.dtype


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    """Type promotion of the inputs; integers scaled by a float multiplier become float32, as in torch."""
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = _promote_pair(result, dtype)
    return result if result.is_floating_point else torch.float32


def _promote_pair(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch's promotion, which refuses float8 beside any other type: there, the other float type
    (every fp8 value is exact in float16, bfloat16 and wider), float16 for the two fp8 kinds
    together, the fp8 type beside an integer."""
    if a == b or (a not in FLOAT8 and b not in FLOAT8):
        return torch.promote_types(a, b)
    other = b if a in FLOAT8 else a
    if other in FLOAT8:
        return torch.float16
    return other if other.is_floating_point else (a if a in FLOAT8 else b)
