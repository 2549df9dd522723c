"""Errors the engine raises. Each message names the file, key or option at fault, so the edges
(CLI, tab, API) can show it as is, without a traceback."""


class MergeError(Exception):
    """Base of every error the engine raises on purpose."""


class RequestError(MergeError):
    """A field of the request is missing or invalid (names the field)."""


class InputError(MergeError):
    """An input file is missing, unreadable, corrupt or unsafe (names the file)."""


class UnsafePickleError(InputError):
    """A .ckpt needs more than tensors to unpickle; it was refused and never ran."""


class IncompatibleModelsError(MergeError):
    """The inputs cannot be merged key by key (names the first key at fault)."""


class OutputError(MergeError):
    """The output cannot be written: it exists, it is an input, or the disk is full."""


class CancelledError(MergeError):
    """The merge was stopped by the user; nothing was written."""


def brief(err: BaseException, limit: int = 300) -> str:
    """An unexpected error as one short line (torch and C++ messages run to pages of stack trace):
    its type and the first line of its message, for the user; the log keeps the whole of it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a huge number or text
    from a request is not echoed back whole (and an int of over 4300 digits has no repr)."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
