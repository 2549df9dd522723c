"""The house's boundaries: what each part of the package may import."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib_merge"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


HOST_CODE = {"modules", "modules_forge", "backend", "ldm", "sgm"}  # what the webui and Forge bring
HOST_ADAPTERS = {"hosts/webui.py": {"modules"}, "hosts/forge.py": {"modules", "modules_forge", "backend"}}


def test_only_the_host_adapters_import_their_hosts_and_only_ui_imports_gradio():
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        imports = imported_modules(path)
        assert not (HOST_CODE - HOST_ADAPTERS.get(relative, set())) & imports, relative
        if not (relative.startswith("ui/") or relative == "app.py"):
            assert "gradio" not in imports, relative
        if relative not in ("api.py", "app.py"):
            assert not {"fastapi", "uvicorn", "starlette"} & imports, relative


def test_each_host_lives_in_hosts_and_the_experiment_loop_in_loop():
    hosts = sorted(path.name for path in (PACKAGE / "hosts").glob("*.py"))
    assert {"__init__.py", "folder.py", "webui.py"} <= set(hosts)
    assert set(hosts) <= {"__init__.py", "folder.py", "webui.py", "forge.py"}, hosts
    loop = sorted(path.name for path in (PACKAGE / "loop").glob("*.py"))
    assert loop == ["__init__.py", "greedy_soup.py", "runner.py", "sweep.py", "xyz_axes.py"]
    stray = [path.name for path in PACKAGE.glob("*.py") if path.stem in {"host", "webui_host", "loop", "sweep"}]
    assert not stray


def test_importing_the_engine_loads_neither_gradio_nor_the_webui():
    code = "import sys, lib_merge, lib_merge.cli, lib_merge.bench, lib_merge.actions, lib_merge.loop.runner, lib_merge.loop.xyz_axes; print(sorted({'gradio', 'modules', 'modules_forge', 'backend', 'fastapi'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_scripts_folder_holds_only_the_entry_script():
    # The webui executes every .py in scripts/: anything else there would run as a second script.
    assert sorted(p.name for p in (ROOT / "scripts").iterdir()) == ["merge_lab.py"]
