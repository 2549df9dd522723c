"""Preflight: everything about a merge that the headers alone can tell, before a byte is written.

``make_plan`` opens the inputs lazily, applies the built-in's key rules, and returns a ``Plan``:
one ``Job`` per output key (merge, copy or VAE) in write order, the output's name, size and the
free space, and the problems that forbid the merge. The tab shows ``plan.report()`` as soon as
the inputs are picked; ``plan.check()`` raises the first problem.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arch
from .channels import channel_merge
from .errors import IncompatibleModelsError, MergeError, OutputError, RequestError
from .host import Checkpoint, Host
from .io import metadata as meta
from .io.readers import CheckpointReader, SafetensorsReader, TensorSpec, open_checkpoint
from .io.writer import safetensors_header
from .methods import Method, get_method
from .request import MergeRequest

# The built-in never merges this key (modules/extras.py, checkpoint_dict_skip_on_merge).
SKIP_ON_MERGE = "cond_stage_model.transformer.text_model.embeddings.position_ids"
ROLES = ("A", "B", "C")
# Keys the webui drops from a VAE file before baking it in (modules/sd_vae.py, load_vae_dict).
VAE_IGNORED = ("model_ema.decay", "model_ema.num_updates")


@dataclass(frozen=True)
class Job:
    """One output key: ``merge`` (method over the inputs), ``copy`` (from A) or ``vae`` (from the VAE)."""

    key: str
    kind: str
    spec: TensorSpec
    inputs: tuple[str | None, ...] = ()  # for merge: per method input, the role holding the key or None
    variant: str | None = None  # merge only the first 4 input channels of A (inpainting / pix2pix)


@dataclass
class Source:
    role: str
    checkpoint: Checkpoint
    reader: CheckpointReader

    @property
    def family(self) -> str:
        return arch.describe_reader(self.reader)


@dataclass
class Plan:
    request: MergeRequest
    method: Method
    sources: dict[str, Source]
    vae: CheckpointReader | None
    jobs: list[Job]
    output: Path
    metadata: dict[str, str]
    variant: str | None
    config: Path | None
    free_bytes: int
    keys_only_in_a: list[str] = field(default_factory=list)
    keys_only_in_b: list[str] = field(default_factory=list)
    problems: list[MergeError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        specs = [(job.key, job.spec) for job in self.jobs]
        return len(safetensors_header(specs, self.metadata)) + sum(s.nbytes for _, s in specs)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self) -> None:
        if self.problems:
            raise self.problems[0]

    def reader(self, role: str) -> CheckpointReader:
        return self.sources[role].reader

    def report(self) -> str:
        """The preflight report, plain text, one fact per line."""
        lines = [f"Method: {self.method.label} (multiplier {self.request.multiplier})"]
        for role, source in self.sources.items():
            reader = source.reader
            dtypes = sorted({str(reader.spec(k).dtype).replace("torch.", "") for k in reader.keys()})
            lines.append(
                f"{role}: {source.checkpoint.name}: {source.family}, {len(reader)} keys, "
                f"{', '.join(dtypes)}, {_size(reader.nbytes)}"
            )
        if "B" in self.sources:
            lines.append(f"Keys only in A (copied): {_some(self.keys_only_in_a)}")
            lines.append(f"Keys only in B (dropped): {_some(self.keys_only_in_b)}")
        if self.variant:
            lines.append(f"A is an {self.variant} model: its first 4 input channels are merged, the rest kept")
        merged = sum(job.kind == "merge" for job in self.jobs)
        lines.append(f"Output: {self.output} ({len(self.jobs)} keys, {merged} merged, {_size(self.output_bytes)})")
        lines.append(f"Free space in {self.output.parent}: {_size(self.free_bytes)}")
        lines += [f"Note: {note}" for note in self.notes]
        lines += [f"Problem: {problem}" for problem in self.problems]
        lines.append("Ready to merge." if self.ok else "Refused: nothing will be written.")
        return "\n".join(lines)

    def close(self) -> None:
        for source in self.sources.values():
            source.reader.close()
        if self.vae is not None:
            self.vae.close()


def make_plan(request: MergeRequest, host: Host, *, hash_inputs: bool = True) -> Plan:
    """Open the inputs and work out the whole merge; problems are collected, not raised.

    ``hash_inputs=False`` is for a preflight that is shown, never run: it reads headers only,
    leaving the recipe's input hashes (a full read of every input) to the merge itself.
    """
    method = get_method(request.interp_method)
    checkpoints = _resolve_inputs(request, method, host)
    sources: dict[str, Source] = {}
    vae = None
    try:
        for role, checkpoint in checkpoints.items():
            sources[role] = Source(role, checkpoint, open_checkpoint(checkpoint.path))
        vae = _open_vae(request, host)
        return _plan(request, method, host, sources, vae, hash_inputs)
    except BaseException:
        for source in sources.values():
            source.reader.close()
        if vae is not None:
            vae.close()
        raise


def _resolve_inputs(request: MergeRequest, method: Method, host: Host) -> dict[str, Checkpoint]:
    """The built-in's checks, in its order and words."""
    names = {
        "A": request.primary_model_name,
        "B": request.secondary_model_name,
        "C": request.tertiary_model_name,
    }
    if not names["A"]:
        raise RequestError("Failed: Merging requires a primary model.")
    if "b" in method.inputs and not names["B"]:
        raise RequestError("Failed: Merging requires a secondary model.")
    if "c" in method.inputs and not names["C"]:
        raise RequestError(f"Failed: Interpolation method ({method.label}) requires a tertiary model.")
    roles = ROLES[: len(method.inputs)]
    return {role: host.resolve(names[role]) for role in roles}


def _open_vae(request: MergeRequest, host: Host) -> CheckpointReader | None:
    name = request.vae_name
    if name is None:
        return None
    path = host.vae_path(name)
    if path is None:
        raise RequestError(f"bake_in_vae: no VAE named {name!r}")
    return open_checkpoint(path)


def _plan(request, method, host, sources, vae, hash_inputs) -> Plan:
    discard = _discard_pattern(request.discard_weights)
    a = sources["A"].reader
    b = sources["B"].reader if "B" in sources else None
    c = sources["C"].reader if "C" in sources else None
    vae_keys = _vae_keys(vae)
    problems: list[MergeError] = []
    variant = None
    jobs = []
    for key in _write_order(a):
        if discard and discard.search(key):
            continue
        if key in vae_keys:
            jobs.append(Job(key, "vae", _half(vae.spec(vae_keys[key]), request.save_as_half)))
            _check_vae_shape(key, a.spec(key), vae.spec(vae_keys[key]), problems)
        elif b is not None and "model" in key and key in b and key != SKIP_ON_MERGE:
            job = _merge_job(key, request, method, a, b, c, problems)
            variant = variant or job.variant
            jobs.append(job)
        else:
            no_interpolation = b is None
            jobs.append(Job(key, "copy", _half(a.spec(key), request.save_as_half and no_interpolation)))
    jobs.sort(key=lambda job: -job.spec.dtype.itemsize)  # stable: keeps every tensor aligned
    only_a = [k for k in a.keys() if b is not None and k not in b]
    only_b = [k for k in b.keys() if k not in a] if b is not None else []
    _check_families(sources, problems)
    inputs = [_input_checkpoint(request, host, s, hash_inputs) for s in sources.values()]
    output = _output_path(request, method, host, sources, variant)
    config = meta.config_to_copy(
        request.config_source, *[s.checkpoint for s in sources.values()], *[None] * (3 - len(sources))
    )
    plan = Plan(
        request,
        method,
        sources,
        vae,
        jobs,
        output,
        meta.build_metadata(request, inputs, variant),
        variant,
        config,
        _free_bytes(output.parent),
        only_a,
        only_b,
        problems,
    )
    _check_output(plan)
    if b is not None and not any(job.kind == "merge" for job in jobs):
        plan.notes.append("A and B have no mergeable key in common: the output is a copy of A")
    return plan


def _merge_job(key, request, method, a, b, c, problems) -> Job:
    a_spec, b_spec = a.spec(key), b.spec(key)
    variant = None
    try:
        variant = channel_merge(key, a_spec.shape, b_spec.shape)
    except IncompatibleModelsError as err:
        problems.append(err)
    c_role = None
    dtypes = [a_spec.dtype, b_spec.dtype]
    if c is not None and key in c:
        c_role = "C"
        dtypes.append(c.spec(key).dtype)
        if c.spec(key).shape != b_spec.shape:
            problems.append(
                IncompatibleModelsError(
                    f"shape mismatch at key {key}: B has {list(b_spec.shape)}, C has {list(c.spec(key).shape)}"
                )
            )
    roles = {"a": "A", "b": "B", "c": c_role}
    dtype = a_spec.dtype if variant else _result_dtype(dtypes)
    spec = _half(TensorSpec(dtype, a_spec.shape), request.save_as_half)
    return Job(key, "merge", spec, tuple(roles[name] for name in method.inputs), variant)


def _result_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """Type promotion of the inputs; integers scaled by a float multiplier become float32, as in torch."""
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result if result.is_floating_point else torch.float32


def _half(spec: TensorSpec, enable: bool) -> TensorSpec:
    """The built-in's to_half: only float32 becomes float16 (bf16 and the rest stay)."""
    return TensorSpec(torch.float16, spec.shape) if enable and spec.dtype == torch.float32 else spec


def _write_order(reader: CheckpointReader) -> list[str]:
    """A's keys in file order, so A is read front to back."""
    if isinstance(reader, SafetensorsReader):
        return sorted(reader.keys(), key=reader.data_offset)
    return reader.keys()


def _discard_pattern(regex: str):
    if not regex:
        return None
    try:
        return re.compile(regex)
    except re.error as err:
        raise RequestError(f"discard_weights: invalid regular expression {regex!r} ({err})") from None


def _vae_keys(vae: CheckpointReader | None) -> dict[str, str]:
    """Output key -> VAE key, for the keys the webui bakes in."""
    if vae is None:
        return {}
    return {f"first_stage_model.{k}": k for k in vae.keys() if not k.startswith("loss") and k not in VAE_IGNORED}


def _check_vae_shape(key: str, model: TensorSpec, vae: TensorSpec, problems: list) -> None:
    if model.shape != vae.shape:
        problems.append(
            IncompatibleModelsError(
                f"bake_in_vae: key {key} has shape {list(vae.shape)} in the VAE but {list(model.shape)} in A: "
                "this VAE does not fit the model"
            )
        )


def _check_families(sources: dict[str, Source], problems: list) -> None:
    families = {role: arch.family_of(s.reader.keys()) for role, s in sources.items()}
    known = {f for f in families.values() if f != arch.UNKNOWN}
    if len(known) > 1:
        shape_problem = next((p for p in problems if "shape mismatch" in str(p)), None)
        detail = f"; first mismatch: {shape_problem}" if shape_problem else ""
        which = ", ".join(f"{role} is {family}" for role, family in families.items())
        problems.insert(0, IncompatibleModelsError(f"the models are different architectures ({which}){detail}"))


def _input_checkpoint(request: MergeRequest, host: Host, source: Source, hash_inputs: bool) -> meta.InputCheckpoint:
    wants_hash = hash_inputs and request.save_metadata and request.add_merge_recipe
    sha256 = host.sha256(source.checkpoint) if wants_hash else None
    return meta.InputCheckpoint(source.checkpoint, sha256, source.reader.metadata)


def _output_path(request, method, host, sources, variant) -> Path:
    if request.output_path:
        path = Path(request.output_path)
        if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt"):
            raise RequestError(f"output: {path} must end in .safetensors or .ckpt")
        return path
    checkpoints = [s.checkpoint for s in sources.values()] + [None] * (3 - len(sources))
    stem = meta.output_stem(request, method.name, *checkpoints, variant)
    return Path(host.output_dir()) / f"{stem}.{request.checkpoint_format}"


def _check_output(plan: Plan) -> None:
    output = plan.output
    inputs = [s.checkpoint.path for s in plan.sources.values()]
    if plan.vae is not None:
        inputs.append(plan.vae.path)
    if any(_same_file(output, path) for path in inputs):
        plan.problems.append(OutputError(f"{output}: is one of the inputs; it is never overwritten"))
    elif output.exists() and not plan.request.overwrite:
        plan.problems.append(OutputError(f"{output}: already exists; tick overwrite (--overwrite) to replace it"))
    if not output.parent.is_dir():
        plan.problems.append(OutputError(f"{output.parent}: no such folder"))
    elif plan.free_bytes < plan.output_bytes:
        plan.problems.append(
            OutputError(
                f"{output.parent}: not enough free space ({_size(plan.free_bytes)} free, "
                f"the output needs {_size(plan.output_bytes)})"
            )
        )
    config_out = meta.config_destination(output)
    if plan.config and config_out.exists() and not plan.request.overwrite:
        plan.problems.append(OutputError(f"{config_out}: already exists; tick overwrite to replace it"))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and a.samefile(b)
    except OSError:
        return False


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _some(keys: list[str], shown: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} ({', '.join(keys[:shown])}{more})"
