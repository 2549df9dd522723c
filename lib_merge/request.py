"""MergeRequest: the one description of a merge that the tab, the API, the CLI and recipes share."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import RequestError, shown
from .precision import check_choice
from .recipe import MergeNode, ModelRef, check_provenance, check_tree_depth

CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")
FORMATS = ("safetensors", "ckpt")
NO_VAE = ("", "None")
# What a request may name; torch would take "meta" or "cuda:x" only to fail deep in the merge.
DEVICES = re.compile(r"|auto|cpu|cuda(:[0-9]{1,3})?|mps")
# The user's metadata is stored in the output's header, which readers refuse past 100 MB; a real
# one is a few KB (a description, a license, trigger words).
MAX_METADATA_JSON = 1_000_000  # characters


@dataclass(frozen=True)
class MergeRequest:
    """The built-in ``run_modelmerger``'s 15 parameters (after ``id_task``), then Merge Lab's own."""

    primary_model_name: str
    secondary_model_name: str = ""
    tertiary_model_name: str = ""
    interp_method: str = "Weighted sum"
    multiplier: float = 0.3
    save_as_half: bool = False
    custom_name: str = ""
    checkpoint_format: str = "safetensors"
    config_source: int = 0
    bake_in_vae: str = "None"
    discard_weights: str = ""
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True
    metadata_json: str = "{}"
    # Merge Lab's own: an existing output is refused unless overwrite; device "auto" asks the host.
    overwrite: bool = False
    device: str = "auto"
    # The output's precision (lib_merge/precision.py): "" the built-in's (the inputs' type promotion,
    # save_as_half's float32 -> float16), "keep" the primary's, or fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2.
    dtype: str = ""
    # An exact output file (the CLI's -o); empty: the built-in's naming in the host's folder.
    output_path: str = ""
    # A recipe tree (any method, nested, per-block parameters); None: the built-in's fields above say
    # what to merge (primary/secondary/tertiary, interp_method, multiplier).
    tree: MergeNode | None = None
    # How this merge was found, e.g. {"greedy_soup": the path taken}: recorded in the recipe under
    # those keys, never used to merge (two requests that differ only here merge the same tensors).
    provenance: dict | None = None

    def __post_init__(self):
        check_provenance(self.provenance)
        object.__setattr__(self, "dtype", check_choice(self.dtype, self.save_as_half))
        if self.tree is not None:
            check_tree_depth(self.tree)
        if not isinstance(self.device, str) or not DEVICES.fullmatch(self.device):
            raise RequestError(f"device: unknown device {shown(self.device)} (auto, cpu, cuda, cuda:N or mps)")
        if not isinstance(self.metadata_json, (str, type(None))):
            raise RequestError(f"metadata_json: expected JSON text, got {type(self.metadata_json).__name__}")
        if len(self.metadata_json or "") > MAX_METADATA_JSON:
            raise RequestError(f"metadata_json: over {MAX_METADATA_JSON:,} characters; keep the metadata short")
        source = self.config_source
        if isinstance(source, str) and source in CONFIG_SOURCES:
            object.__setattr__(self, "config_source", CONFIG_SOURCES.index(source))
        elif not (isinstance(source, int) and 0 <= source < len(CONFIG_SOURCES)):
            raise RequestError(f"config_source: expected 0-3 or one of {CONFIG_SOURCES}, got {shown(source)}")
        if self.checkpoint_format not in FORMATS:
            raise RequestError(f"checkpoint_format: expected one of {FORMATS}, got {shown(self.checkpoint_format)}")
        try:
            object.__setattr__(self, "multiplier", float(self.multiplier))
        except (TypeError, ValueError):
            raise RequestError(f"multiplier: expected a number, got {shown(self.multiplier)}") from None
        except OverflowError:  # an integer past 1.8e308, e.g. JSON's 1 followed by 400 zeros
            raise RequestError(f"multiplier: {shown(self.multiplier)} is outside the range of a float") from None
        if self.multiplier != self.multiplier or abs(self.multiplier) == float("inf"):
            raise RequestError(f"multiplier: expected a finite number, got {self.multiplier!r}")

    @classmethod
    def from_webui_args(cls, id_task, *args, **merge_lab_options) -> MergeRequest:
        """Build a request from ``run_modelmerger``'s positional arguments (``id_task`` is ignored)."""
        names = [f.name for f in dataclasses.fields(cls)][: len(args)]
        return cls(**dict(zip(names, args, strict=True)), **merge_lab_options)

    def root(self) -> MergeNode:
        """What to merge, as a tree: the given one, or the built-in's fields as a one-node tree."""
        if self.tree is not None:
            return self.tree
        from .methods import get_method

        method = get_method(self.interp_method)
        names = [self.primary_model_name, self.secondary_model_name, self.tertiary_model_name]
        names = [n for n in names if n] if method.variadic else names[: len(method.inputs)]
        params = {"alpha": self.multiplier} if "alpha" in method.params else {}
        return MergeNode(method.name, tuple(ModelRef(name) for name in names), params)

    @property
    def vae_name(self) -> str | None:
        return None if self.bake_in_vae in NO_VAE or self.bake_in_vae is None else self.bake_in_vae
