"""What a name from the tab, the API or a recipe may mean: a file inside one of the host's folders.

Every untrusted name passes through here before it touches the filesystem. A name is relative,
has no ``..`` segment, no NUL or control character, and fits the filesystem's 255-byte limit, so
joining it to a folder can only name something inside that folder (or behind a symlink the user
put there: that is their choice and keeps working). The CLI, whose paths come from the person at
the keyboard, does not use these rules for its own arguments.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import RequestError

NAME_MAX_BYTES = 255  # one path component, on every common filesystem
# The writer's hidden temp name wraps the output's name: ".{name}.{8 hex}.merge-lab.tmp", and a
# config copy ".{stem}.yaml.merge-lab.tmp". An output name leaves room for the longest wrapper.
TEMP_NAME_OVERHEAD = 40
_SEPARATORS = re.compile(r"[\\/]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def relative_name(name: str, field: str) -> PurePosixPath:
    """``name`` as a relative path that cannot leave its folder; RequestError naming ``field`` else."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"{field}: empty name")
    _check_characters(name, field)
    if name.startswith(("/", "\\", "~")) or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise RequestError(f"{field}: absolute paths are not accepted; give a name inside the folder")
    parts = [part for part in _SEPARATORS.split(name) if part not in ("", ".")]
    if ".." in parts:
        raise RequestError(f"{field}: '..' is not accepted (a name cannot leave its folder)")
    if not parts:
        raise RequestError(f"{field}: names no file")
    for part in parts:
        _check_length(part, field, NAME_MAX_BYTES)
    return PurePosixPath(*parts)


def inside(folder: Path, name: str, field: str) -> Path:
    """The file ``name`` names inside ``folder`` (never outside it, whatever the name says)."""
    return Path(folder) / relative_name(name, field)


def output_file_name(name: str, field: str) -> str:
    """An output's file name, as typed in custom_name: one name in the output folder, no folders,
    short enough that its hidden temp name fits the filesystem too."""
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"{field}: empty name")
    _check_characters(name, field)
    if _SEPARATORS.search(name) or PureWindowsPath(name).drive:
        raise RequestError(f"{field}: a file name without folders is expected ('/' and '\\' are not accepted)")
    if name.strip(".") == "" or name.startswith("."):
        raise RequestError(f"{field}: cannot start with '.' (hidden files and '..' are not outputs)")
    _check_length(name, field, NAME_MAX_BYTES - TEMP_NAME_OVERHEAD)
    return name


def shorten(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), marked with '...'."""
    if len(name.encode()) <= limit:
        return name
    cut = name.encode()[: limit - 3].decode(errors="ignore")
    return cut.rstrip(", ") + "..."


def _check_characters(name: str, field: str) -> None:
    if "\0" in name:
        raise RequestError(f"{field}: a name cannot contain the NUL character")
    if _CONTROL.search(name):
        raise RequestError(f"{field}: a name cannot contain control characters (newline, tab ...)")


def _check_length(part: str, field: str, limit: int) -> None:
    size = len(part.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise RequestError(f"{field}: the name is {size} bytes long; at most {limit} bytes are accepted here")
