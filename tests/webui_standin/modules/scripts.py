"""modules/scripts.py: the loaded scripts list that extensions search for the built-in X/Y/Z plot.

Copies from webui v1.10.1: ``ScriptFile(basedir, filename, path)``, ``ScriptClassData(script_class,
path, basedir, module)``, the module level ``scripts_data`` list, a ``Script`` base class, and how
``load_scripts`` fills the list: each script file is executed as a module named after the file
(``xyz_grid.py``: ``importlib.util.spec_from_file_location`` as in modules/script_loading.py, not in
``sys.modules``), and every ``Script`` subclass in the module's namespace is recorded with that
module. One liberty: the module is named after ``ScriptFile.filename`` rather than the path's own
basename, so tests/webui_standin/xyz_grid_standin.py can be loaded as ``xyz_grid.py`` without being
named like the real file. Script folders, ordering, callbacks and UI are left out.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections import namedtuple

ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data: list[ScriptClassData] = []


class Script:
    """The base class the webui looks for in a script file (title() names it in the Script dropdown)."""

    def title(self) -> str:
        raise NotImplementedError


def script_file(path, filename: str | None = None, basedir: str = "") -> ScriptFile:
    """A ScriptFile for ``path``; ``filename`` defaults to the path's basename, as in the webui."""
    return ScriptFile(basedir, filename or os.path.basename(path), str(path))


def load_module(scriptfile: ScriptFile):
    """Execute a script file as a module named after its file name, outside ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(scriptfile.filename, scriptfile.path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scripts(script_files) -> list[ScriptClassData]:
    """Replace ``scripts_data`` with the Script subclasses of ``script_files`` (ScriptFiles), in order."""
    scripts_data.clear()
    for scriptfile in script_files:
        module = load_module(scriptfile)
        for script_class in module.__dict__.values():
            if inspect.isclass(script_class) and issubclass(script_class, Script):
                scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
    return scripts_data
