"""Where gradio 3.41 (AUTOMATIC1111's webui, the standalone app) and gradio 4.40 (Forge) differ for
the tab: the one place that asks which gradio this is. The tab code is otherwise the same for both.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def page_hook(function: str) -> dict:
    """The page script to run before an event (``.click``, ``.change``, ``.then`` ...), under the
    keyword this gradio takes: ``_js`` in gradio 3, ``js`` in gradio 4 (which refuses ``_js``)."""
    return {"js" if GRADIO_4 else "_js": function}


def upload_folders(component) -> list[Path]:
    """Where this gradio keeps the files a page uploads, however it is configured: gradio 3 copies
    them into the component's ``DEFAULT_TEMP_DIR``, gradio 4 into its ``GRADIO_CACHE``; both default
    to ``$GRADIO_TEMP_DIR`` or the system temp folder's ``gradio``."""
    folders = {
        os.environ.get("GRADIO_TEMP_DIR"),
        getattr(component, "GRADIO_CACHE", None),
        getattr(component, "DEFAULT_TEMP_DIR", None),
        str(Path(tempfile.gettempdir()) / "gradio"),
    }
    return [Path(folder).resolve() for folder in folders if folder]


def upload_names(upload) -> list[str]:
    """The paths an uploaded file's value names. gradio 3 gives a temp file wrapper: ``.name`` is
    its copy, ``.orig_name`` the path the client sent; gradio 4 gives the path itself, a ``str``
    (``gradio.utils.NamedString``, whose ``.name`` is the same path)."""
    names = [getattr(upload, "orig_name", None), getattr(upload, "name", upload)]
    return [str(name) for name in names if name]
