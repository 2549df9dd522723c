"""The command line, run the two ways the tests need: in this process, or as ``python -m lib_merge``.

``python -m lib_merge`` is ``sys.exit(main())``, so ``run_cli`` calls ``main`` here with the same
arguments and captures what it prints: the same parsing, messages and exit codes, without a child
that imports torch again (5-8 s a call on CI's 2 cores). ``spawn_cli`` runs the real entry point,
for the tests about the process itself (its exit status, a kill, the module's ``__main__``).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys

from lib_merge.cli import main


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    folder, sigterm = os.getcwd(), signal.getsignal(signal.SIGTERM)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's usage errors and --help
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(folder)
        signal.signal(signal.SIGTERM, sigterm)  # main() installs its own
    return subprocess.CompletedProcess(["merge-lab", *argv], code, stdout.getvalue(), stderr.getvalue())


def spawn_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lib_merge", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)
