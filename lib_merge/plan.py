"""Preflight: everything about a merge that the headers alone can tell, before a byte is written.

``make_plan`` opens the inputs lazily, applies the built-in's key rules, and returns a ``Plan``:
one ``Job`` per output key (merge, copy or VAE) in write order, the output's name, size and the
free space, and the problems that forbid the merge. The tab shows ``plan.report()`` as soon as
the inputs are picked; ``plan.check()`` raises the first problem.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arch, blocks, names
from .errors import IncompatibleModelsError, InputError, MergeError, OutputError, RequestError
from .hosts import Checkpoint, Host, resolve_lora
from .io import metadata as meta
from .io.formats import open_checkpoint
from .io.readers import CheckpointReader, TensorSpec
from .io.writer import safetensors_header
from .matching import match_inputs
from .methods import Method, get_method
from .precision import describe, output_dtype
from .recipe import MergeNode, ModelRef
from .request import MergeRequest
from .steps import Step, Tree

# Keys the webui drops from a VAE file before baking it in (modules/sd_vae.py, load_vae_dict).
VAE_IGNORED = ("model_ema.decay", "model_ema.num_updates")
MODEL_FIELDS = ("primary_model_name", "secondary_model_name", "tertiary_model_name")


@dataclass(frozen=True)
class Job:
    """One output key: ``merge`` (method over the inputs), ``copy`` (from A) or ``vae`` (from the VAE)."""

    key: str
    kind: str
    spec: TensorSpec
    step: Step | None = None  # for merge: what computes it


@dataclass
class Source:
    role: str
    checkpoint: Checkpoint
    reader: CheckpointReader  # as merged: in A's key layout (see matching.py)
    as_stored: CheckpointReader | None = None  # the file's own keys, where ``reader`` presents others

    @property
    def family(self) -> str:
        """The file's family, from its own keys (a part read in A's layout may lose its family's marker)."""
        return arch.describe_reader(self.as_stored or self.reader)


@dataclass
class Plan:
    request: MergeRequest
    tree: MergeNode  # as merged: the models chosen, their hashes filled in when computed
    roles: dict[str, str]  # model name in the tree -> role (A, B, C ...)
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
    layouts: list[str] = field(default_factory=list)  # how inputs in other layouts were matched to A's
    lora_notes: list[str] = field(default_factory=list)  # what each LoRA leaves out: the result says it again

    @property
    def output_bytes(self) -> int:
        from .io.writer import ckpt_size  # the .ckpt layout is the writer's knowledge

        specs = [(job.key, job.spec) for job in self.jobs]
        if self.output.suffix.lower() != ".safetensors":  # torch.save's zip takes more than safetensors
            return ckpt_size(specs)
        return len(safetensors_header(specs, self.metadata)) + sum(s.nbytes for _, s in specs)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, *, ignore_output: bool = False) -> None:
        """Raise the first problem found in preflight; ``ignore_output`` when no file will be written."""
        problems = [p for p in self.problems if not (ignore_output and isinstance(p, OutputError))]
        if problems:
            raise problems[0]

    def reader(self, role: str) -> CheckpointReader:
        return self.sources[role].reader

    @property
    def method(self) -> Method:
        return get_method(self.tree.method)

    def report(self) -> str:
        """The preflight report, plain text, one fact per line."""
        lines = [f"Method: {_describe(self.tree, self.roles)}"]
        for role, source in self.sources.items():
            reader = source.reader
            dtypes = sorted({str(reader.spec(k).dtype).replace("torch.", "") for k in reader.keys()})
            lines.append(
                f"{role}: {source.checkpoint.name}: {source.family}, {len(reader)} keys, "
                f"{', '.join(dtypes)}, {_size(reader.nbytes)}"
                + (f"; {reader.format_note}" if reader.format_note else "")
            )
        lines += self.layouts
        if len(self.sources) > 1:
            others = "B" if len(self.sources) == 2 else "the other inputs"
            lines.append(f"Keys only in A (copied): {_some(self.keys_only_in_a)}")
            lines.append(f"Keys only in {others} (dropped): {_some(self.keys_only_in_b)}")
        if self.variant:
            lines.append(f"A is an {self.variant} model: its first 4 input channels are merged, the rest kept")
        merged = sum(job.kind == "merge" for job in self.jobs)
        lines.append(f"Output: {self.output} ({len(self.jobs)} keys, {merged} merged, {_size(self.output_bytes)})")
        precision = describe(self.request.dtype, self.request.save_as_half)
        lines.append(f"Output dtypes: {self.output_dtypes()} ({precision})")
        lines.append(f"Free space in {self.output.parent}: {_size(self.free_bytes)}")
        lines += [f"Note: {note}" for note in self.lora_notes + self.notes]
        lines += [f"Problem: {problem}" for problem in self.problems]
        lines.append("Ready to merge." if self.ok else "Refused: nothing will be written.")
        return "\n".join(lines)

    def output_dtypes(self) -> str:
        """``float16 (1142 keys), int64 (1 key)``: the output's dtypes, most used first."""
        counts = Counter(str(job.spec.dtype).removeprefix("torch.") for job in self.jobs)
        return ", ".join(f"{name} ({n} key{'s' if n != 1 else ''})" for name, n in counts.most_common())

    def close(self) -> None:
        for source in self.sources.values():
            source.reader.close()
        if self.vae is not None:
            self.vae.close()


def make_plan(request: MergeRequest, host: Host, *, hash_inputs: bool = True, open_input=open_checkpoint) -> Plan:
    """Open the inputs and work out the whole merge; problems are collected, not raised.

    ``hash_inputs=False`` is for a preflight that is shown, never run: it reads headers only,
    leaving the recipe's input hashes (a full read of every input) to the merge itself.
    ``open_input`` opens a model file (a sweep's InputCache.open keeps its tensors between merges).
    """
    from .lora.inputs import lora_input, lora_notes  # the lora package builds on the engine

    if request.tree is None:
        _check_builtin_inputs(request)
    if request.custom_name and not request.output_path:  # refused before any file is opened or hashed
        names.output_file_name(f"{request.custom_name}.{request.checkpoint_format}", "custom_name")
    tree = request.root()
    tree.validate()
    checkpoints = _resolve_models(request, tree, host)
    tree = _choose(tree, checkpoints)
    roles = _roles(tree)
    sources: dict[str, Source] = {}
    vae = None
    try:
        for name, role in roles.items():
            checkpoint = checkpoints[name]
            # A LoRA is read as changes to the primary, which is opened first (role A).
            reader = lora_input(checkpoint, sources["A"]) if checkpoint.lora else open_input(checkpoint.path)
            sources[role] = Source(role, checkpoint, reader)
        vae = _open_vae(request, host)
        plan = _plan(request, tree, roles, host, sources, vae, hash_inputs)
        plan.lora_notes = lora_notes(plan)
        return plan
    except BaseException:
        for source in sources.values():
            source.reader.close()
        if vae is not None:
            vae.close()
        raise


def _resolve_models(request: MergeRequest, tree: MergeNode, host: Host) -> dict[str, Checkpoint]:
    """Each model (or LoRA) name as the host resolves it; an error names the field that gave the name."""
    refs = list(tree.models())
    where = MODEL_FIELDS if request.tree is None else [f"recipe {ref.field} {i + 1}" for i, ref in enumerate(refs)]
    if refs[0].lora:
        raise RequestError(f"{where[0]}: {refs[0].name} is a LoRA; the first input is the model it changes")
    checkpoints = {}
    for source, ref in zip(where, refs, strict=False):
        if ref.name in checkpoints:
            if checkpoints[ref.name].lora != ref.lora:
                raise RequestError(f"{source}: {ref.name} is named both as a model and as a LoRA; rename one file")
            continue
        try:
            checkpoints[ref.name] = resolve_lora(host, ref.name) if ref.lora else host.resolve(ref.name)
        except MergeError as err:
            raise type(err)(f"{source}: {err}") from None
    return checkpoints


def _check_builtin_inputs(request: MergeRequest) -> None:
    """The built-in's checks of its three model fields, in its order and words."""
    method = get_method(request.interp_method)
    if not request.primary_model_name:
        raise RequestError("Failed: Merging requires a primary model.")
    if "b" in method.inputs and not request.secondary_model_name:
        raise RequestError("Failed: Merging requires a secondary model.")
    if "c" in method.inputs and not request.tertiary_model_name:
        raise RequestError(f"Failed: Interpolation method ({method.label}) requires a tertiary model.")


def _choose(node: MergeNode, checkpoints: dict[str, Checkpoint]) -> MergeNode:
    """The tree with each choosing method's inputs narrowed to the models it picks (average_last)."""
    inputs = tuple(_choose(i, checkpoints) if isinstance(i, MergeNode) else i for i in node.inputs)
    method = get_method(node.method)
    if method.choose is not None and all(isinstance(i, ModelRef) for i in inputs):
        params = method.check_params(node.params)
        by_path = {checkpoints[ref.name].path: ref for ref in inputs}
        inputs = tuple(by_path[path] for path in method.choose(list(by_path), params))
    return MergeNode(node.method, inputs, node.params, node.blocks)


def _roles(tree: MergeNode) -> dict[str, str]:
    """Model name -> role: A, B, C ... in order of first use; a model used twice is read once."""
    names = list(dict.fromkeys(ref.name for ref in tree.models()))
    return {name: chr(ord("A") + i) if i < 26 else f"M{i + 1}" for i, name in enumerate(names)}


def _bind(node: MergeNode, roles: dict[str, str], family: str, model_keys_only: bool) -> Tree:
    """The node with models as roles, parameters checked and block values parsed for ``family``."""
    method = get_method(node.method)
    repeated = len(node.inputs) - len(method.inputs) + 1 if method.variadic else None
    params = method.check_params(node.params, repeated)
    block_values = {
        name: blocks.parse_blocks(text, family, param=name, default=params[name]) for name, text in node.blocks.items()
    }
    inputs = [
        _bind(i, roles, family, model_keys_only) if isinstance(i, MergeNode) else roles[i.name] for i in node.inputs
    ]
    return Tree(method, inputs, params, block_values, model_keys_only=model_keys_only)


def _open_vae(request: MergeRequest, host: Host) -> CheckpointReader | None:
    name = request.vae_name
    if name is None:
        return None
    path = host.vae_path(name)
    if path is None:
        raise RequestError(f"bake_in_vae: no VAE named {name!r}")
    return open_checkpoint(path)


def _plan(request, tree, roles, host, sources, vae, hash_inputs) -> Plan:
    discard = _discard_pattern(request.discard_weights)
    matching = match_inputs({role: source.reader for role, source in sources.items()})
    for role, source in sources.items():
        if matching.readers[role] is not source.reader:  # a bare, diffusers or part-only file read in A's layout
            source.reader, source.as_stored = matching.readers[role], source.reader
    readers = matching.readers
    a = readers["A"]
    family = arch.family_of(a.keys())
    # The built-in's "model" key rule is for SD checkpoints; a file of one bare part (a transformer,
    # text encoder or VAE alone) has no such buffers, and few keys with "model" in their names.
    bound = _bind(tree, roles, family, model_keys_only=family not in arch.TRANSFORMERS and not matching.primary.alone)
    single = len(sources) == 1  # no interpolation: the built-in halves every float32 tensor
    vae_keys = _vae_keys(vae)
    problems: list[MergeError] = list(matching.problems)
    jobs = []
    for key in _write_order(a):
        if discard and discard(key):
            continue
        primary = a.spec(key).dtype
        if key in vae_keys:
            jobs.append(Job(key, "vae", _output(key, vae.spec(vae_keys[key]), request, primary, request.save_as_half)))
            _check_vae_shape(key, a.spec(key), vae.spec(vae_keys[key]), problems)
            continue
        step = bound.step(key, readers, problems)
        if isinstance(step, Step):
            spec = _output(key, TensorSpec(step.dtype, step.shape), request, primary, request.save_as_half)
            jobs.append(Job(key, "merge", spec, step))
        else:
            jobs.append(Job(key, "copy", _output(key, a.spec(key), request, primary, request.save_as_half and single)))
    jobs.sort(key=lambda job: -job.spec.dtype.itemsize)  # stable: keeps every tensor aligned
    others = [reader for role, reader in readers.items() if role != "A"]
    only_a = [k for k in a.keys() if others and any(k not in r for r in others)]
    only_others = list(dict.fromkeys(k for r in others for k in r.keys() if k not in a))
    variant = next((job.step.variant for job in jobs if job.step and job.step.variant), None)
    refused = _check_families(sources, problems) or bool(matching.problems)
    hash_inputs = hash_inputs and not refused  # refused from the headers: no input is read in full
    inputs = [_input_checkpoint(request, host, s, hash_inputs) for s in sources.values()]
    if any(ref.sha256 for ref in tree.models()):
        known = {role: item.sha256 for role, item in zip(sources, inputs, strict=True)}
        _check_input_hashes(tree, roles, sources, known, host, hash_inputs, problems)
    # The recipe names each input as the host lists it (a webui title's " [hash]" dropped) and by sha256.
    refs = {
        name: ModelRef(sources[role].checkpoint.name, inputs[i].sha256) for i, (name, role) in enumerate(roles.items())
    }
    merged_tree = _as_given(tree, bound).with_refs(refs)
    checkpoints = {refs[name].name: sources[role].checkpoint for name, role in roles.items()}
    output = _output_path(request, merged_tree, checkpoints, host, variant)
    first_three = [s.checkpoint for s in sources.values()][:3]
    config = meta.config_to_copy(request.config_source, *first_three, *[None] * (3 - len(first_three)))
    plan = Plan(
        request,
        merged_tree,
        {refs[name].name: role for name, role in roles.items()},
        sources,
        vae,
        jobs,
        output,
        meta.build_metadata(request, merged_tree, inputs, variant),
        variant,
        config,
        _free_bytes(output.parent),
        only_a,
        only_others,
        problems,
        layouts=matching.lines,
    )
    _check_output(plan)
    note = blocks.block_note(family) if _uses_blocks(tree) else None
    if note:
        plan.notes.append(note)
    plan.notes += _marker_notes(sources)
    if not single and not refused and not any(job.kind == "merge" for job in jobs):
        plan.problems.insert(0, _nothing_merged(readers, discard is not None))
    return plan


def _nothing_merged(readers: dict[str, CheckpointReader], discarding: bool) -> IncompatibleModelsError:
    """A merge whose output would be a copy of A is almost always a mistake (two key layouts, a
    discard pattern taking everything): refused, saying which."""
    a, others = readers["A"], {role: r for role, r in readers.items() if role != "A"}
    if any(key in r for r in others.values() for key in a.keys()):
        reason = "discard_weights leaves no key to merge" if discarding else "no key they share can be merged"
        return IncompatibleModelsError(f"nothing would be merged: {reason}; the output would be a copy of A")
    layouts = "; ".join(f"{role}: {arch.key_layout(r.keys())}" for role, r in readers.items())
    return IncompatibleModelsError(
        f"nothing would be merged: the inputs have no key in common (their keys are laid out differently: "
        f"{layouts}); the output would be a copy of A"
    )


def _check_input_hashes(tree, roles, sources, known, host, hash_inputs, problems) -> None:
    """A recipe names its inputs by sha256 too: a different file under the same name is refused.

    ``known`` holds the hashes the metadata step already computed (role -> sha256 or None).
    """
    if not hash_inputs:
        return  # a shown preflight reads headers only; the merge itself checks
    for ref in tree.models():
        if ref.sha256:
            role = roles[ref.name]
            checkpoint = sources[role].checkpoint
            actual = known[role] or host.sha256(checkpoint)
            if actual != ref.sha256:
                problems.insert(
                    0,
                    InputError(
                        f"{checkpoint.path}: sha256 is {actual[:12]}..., but the recipe was made with "
                        f"{ref.sha256[:12]}... ({ref.name}); this is a different file, so it is not merged"
                    ),
                )
                return


def _as_given(node: MergeNode, bound: Tree) -> MergeNode:
    """The node with its given parameters as checked values and its block values spelled out, so a
    recipe replays the same even if a preset changes."""
    inputs = tuple(
        _as_given(item, sub) if isinstance(item, MergeNode) else item
        for item, sub in zip(node.inputs, bound.inputs, strict=True)
    )
    params = {name: bound.params[name] for name in node.params}
    block_texts = {name: bound.blocks[name].to_text() for name in node.blocks}
    return MergeNode(node.method, inputs, params, block_texts)


def _uses_blocks(node: MergeNode) -> bool:
    return bool(node.blocks) or any(_uses_blocks(i) for i in node.inputs if isinstance(i, MergeNode))


def _describe(node: MergeNode, roles: dict[str, str]) -> str:
    """``TIES (density 0.2, lambda 1) over A, B, C``, nested nodes in brackets."""
    method = get_method(node.method)
    values = method.check_params(node.params)
    shown = [f"{name} {value:g}" for name, value in values.items() if isinstance(value, float)]
    shown += [f"{name} per block" for name in node.blocks]
    inputs = ", ".join(f"[{_describe(i, roles)}]" if isinstance(i, MergeNode) else roles[i.name] for i in node.inputs)
    return f"{method.label} ({', '.join(shown)}) over {inputs}" if shown else f"{method.label} over {inputs}"


def _half(spec: TensorSpec, enable: bool) -> TensorSpec:
    """The built-in's to_half: only float32 becomes float16 (bf16 and the rest stay)."""
    return TensorSpec(torch.float16, spec.shape) if enable and spec.dtype == torch.float32 else spec


def _output(key: str, spec: TensorSpec, request: MergeRequest, primary: torch.dtype, half: bool) -> TensorSpec:
    """An output tensor's spec: the built-in's dtype (``spec``, to_half where ``half``), then the
    request's precision (``dtype``), which ``primary`` (A's dtype at that key) serves for "keep"."""
    return TensorSpec(output_dtype(key, request.dtype, _half(spec, half).dtype, primary), spec.shape)


def _write_order(reader: CheckpointReader) -> list[str]:
    """A's keys in file order, so A is read front to back."""
    if hasattr(reader, "data_offset"):
        return sorted(reader.keys(), key=reader.data_offset)
    return reader.keys()


# discard_weights is searched in every key: one time budget for the whole key list, so a pattern
# that backtracks without end (``^(a|aa)+$``) is refused at preflight instead of holding the server.
DISCARD_SECONDS = 1.0
DISCARD_MAX_CHARS = 2_000
# The regex module unrolls counted repeats when it compiles ((?:a{1000}){1000}: a second and 600 MB
# before any search), so the product of the counts' minimums is capped first.
DISCARD_MAX_REPEAT = 10_000


def _discard_pattern(pattern: str):
    """``discarded(key)`` for the keys to drop, or None. Compiled by the ``regex`` module (the
    syntax of ``re``, which the built-in uses, plus a timeout); each search gets what is left of
    DISCARD_SECONDS and releases the GIL, so other requests run meanwhile."""
    if not pattern:
        return None
    if not isinstance(pattern, str):
        raise RequestError(f"discard_weights: expected a regular expression, got {type(pattern).__name__}")
    if len(pattern) > DISCARD_MAX_CHARS:
        raise RequestError(f"discard_weights: the pattern is over {DISCARD_MAX_CHARS:,} characters")
    repeats = 1
    for low in re.findall(r"\{(\d*)(?:,\d*)?\}", pattern):
        repeats *= max(1, int(low[:7] or 0))  # 7 digits are already past the cap
        if repeats > DISCARD_MAX_REPEAT:
            raise RequestError(f"discard_weights: counted repeats {{n}} multiply to over {DISCARD_MAX_REPEAT:,}")
    try:
        import regex
    except ImportError:
        raise RequestError("discard_weights: needs the regex package (pip install regex)") from None
    try:
        compiled = regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else err
        raise RequestError(f"discard_weights: invalid regular expression {pattern[:60]!r} ({reason})") from None
    import time

    deadline = time.monotonic() + DISCARD_SECONDS

    def discarded(key: str) -> bool:
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return compiled.search(key, concurrent=True, timeout=left) is not None
        except TimeoutError:
            raise RequestError(
                f"discard_weights: the pattern took too long on key {key[:100]} (over {DISCARD_SECONDS:g} s); "
                "simplify it"
            ) from None

    return discarded


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


def _check_families(sources: dict[str, Source], problems: list) -> bool:
    """Refuse inputs of different families (SD1 and SDXL, Flux dev and schnell, SD3 medium and
    SD3.5 large), naming each input's family and file; True when refused."""
    families = {role: arch.family_of((s.as_stored or s.reader).keys()) for role, s in sources.items()}
    known = {f for f in families.values() if f != arch.UNKNOWN}
    if len(known) <= 1:
        return False
    shape_problem = next((p for p in problems if "shape mismatch" in str(p)), None)
    detail = f"; first mismatch: {shape_problem}" if shape_problem else ""
    which = ", ".join(_family_of_input(role, family, sources[role]) for role, family in families.items())
    problems.insert(0, IncompatibleModelsError(f"the models are different architectures: {which}{detail}"))
    return True


def _family_of_input(role: str, family: str, source: Source) -> str:
    """E.g. ``B is Flux schnell (s.safetensors: no guidance_in.* keys)``."""
    sign = arch.family_sign(family)
    return f"{role} is {family} ({source.checkpoint.name}{f': {sign}' if sign else ''})"


def _marker_notes(sources: dict[str, Source]) -> list[str]:
    """A note when the inputs disagree on how they are sampled (a v-prediction and an eps model):
    the output keeps A's marker keys (keys only in B are dropped) and A's modelspec fields."""
    markers = {role: arch.prediction_markers(s.reader.keys(), s.reader.metadata) for role, s in sources.items()}
    disagreeing = []
    for marker in markers["A"]:
        values = {role: found[marker] for role, found in markers.items()}
        if len(set(values.values())) > 1:
            disagreeing.append(f"{marker} " + ", ".join(f"{role} {value}" for role, value in values.items()))
    if not disagreeing:
        return []
    return [f"the inputs disagree on how they are sampled ({'; '.join(disagreeing)}): the output keeps A's"]


def _input_checkpoint(request: MergeRequest, host: Host, source: Source, hash_inputs: bool) -> meta.InputCheckpoint:
    wants_hash = hash_inputs and request.save_metadata and request.add_merge_recipe
    sha256 = host.sha256(source.checkpoint) if wants_hash else None
    return meta.InputCheckpoint(source.checkpoint, sha256, source.reader.metadata)


def _output_path(request, tree: MergeNode, checkpoints: dict[str, Checkpoint], host, variant) -> Path:
    if request.output_path:  # the CLI's -o: a path the user typed, anywhere
        path = Path(request.output_path)
        if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt"):
            raise RequestError(f"output: {path} must end in .safetensors or .ckpt")
        return path
    suffix = f".{request.checkpoint_format}"
    stem = meta.output_stem(request, tree, checkpoints, variant)
    if request.custom_name:  # typed by whoever reaches the tab or the API: one file in the output folder
        name = names.output_file_name(stem + suffix, "custom_name")
    else:  # made from model names, which can be long: cut to fit the filesystem
        name = names.shorten(stem, names.NAME_MAX_BYTES - names.TEMP_NAME_OVERHEAD - len(suffix)) + suffix
    return Path(host.output_dir()) / name


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
