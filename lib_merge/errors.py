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
