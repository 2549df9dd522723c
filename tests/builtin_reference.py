"""An independent float64 transcription of the webui's run_modelmerger (modules/extras.py, v1.10.1).

It follows the built-in's two passes on whole dicts, but computes in float64 so that the engine's
output can be checked to within one unit in the last place; it also gives each key's expected dtype.
"""

from __future__ import annotations

import re

import torch

SKIP = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _to_half(dtype: torch.dtype, enable: bool) -> torch.dtype:
    return torch.float16 if enable and dtype == torch.float32 else dtype


def reference_merge(theta_0, theta_1, theta_2, method, multiplier, save_as_half=False, vae=None, discard=""):
    """Returns {key: (exact float64 value, expected dtype)} and the variant found."""
    exact = {k: (v.double(), v.dtype) for k, v in theta_0.items()}
    variant = None
    diff = None
    if method == "Add difference":
        diff = {}
        for key, b in theta_1.items():
            if "model" in key and key != SKIP:
                if key in theta_2:
                    diff[key] = (b.double() - theta_2[key].double(), torch.promote_types(b.dtype, theta_2[key].dtype))
                else:
                    diff[key] = (torch.zeros_like(b, dtype=torch.float64), b.dtype)
            else:
                diff[key] = (b.double(), b.dtype)
    if method != "No interpolation":
        for key, a in theta_0.items():
            if "model" not in key or key not in theta_1 or key == SKIP:
                continue
            b, b_dtype = diff[key] if diff is not None else (theta_1[key].double(), theta_1[key].dtype)
            a64 = a.double()

            def combine(x, y):
                if method == "Weighted sum":
                    return (1 - multiplier) * x + multiplier * y
                return x + multiplier * y

            if a.shape != b.shape:
                value = a64.clone()
                value[:, 0:4] = combine(a64[:, 0:4], b)
                variant = "inpainting" if a.shape[1] == 9 else "instruct-pix2pix"
                dtype = a.dtype
            else:
                value = combine(a64, b)
                dtype = torch.promote_types(a.dtype, b_dtype)
                dtype = dtype if dtype.is_floating_point else torch.float32
            exact[key] = (value, _to_half(dtype, save_as_half))
    for key, tensor in (vae or {}).items():
        full = "first_stage_model." + key
        if full in exact and not key.startswith("loss"):
            exact[full] = (tensor.double(), _to_half(tensor.dtype, save_as_half))
    if save_as_half and method == "No interpolation":
        exact = {k: (v, _to_half(d, True)) for k, (v, d) in exact.items()}
    if discard:
        exact = {k: v for k, v in exact.items() if not re.search(discard, k)}
    return exact, variant
