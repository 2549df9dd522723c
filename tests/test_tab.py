"""The tab's structure, built with the real gradio over a FolderHost (no browser needed for these)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from lib_merge.ui import tab as tab_module  # noqa: E402

REQUIRED_IDS = {
    "merge_lab_primary", "merge_lab_secondary", "merge_lab_tertiary", "merge_lab_method", "merge_lab_multiplier",
    "merge_lab_custom_name", "merge_lab_merge", "merge_lab_result",
}  # fmt: skip


def components(blocks) -> list[dict]:
    return [c for c in blocks.config["components"] if c.get("type") not in ("row", "column", "form", "group", "state")]


def test_every_control_has_a_stable_merge_lab_id(host):
    blocks = tab_module.build_tab(host)
    ids = [c["props"].get("elem_id") for c in components(blocks)]
    assert set(ids) >= REQUIRED_IDS
    unnamed = [c["type"] for c in components(blocks) if not c["props"].get("elem_id")]
    assert unnamed == []
    assert all(elem_id.startswith("merge_lab_") for elem_id in ids)
    assert len(ids) == len(set(ids)), "an elem_id is used twice"


def test_standalone_hides_what_needs_a_webui(host):
    props = {c["props"].get("elem_id"): c["props"] for c in components(tab_module.build_tab(host))}
    assert props["merge_lab_load"]["visible"] is False and props["merge_lab_load"]["value"] is False
    assert props["merge_lab_merge_open"]["visible"] is False
    assert props["merge_lab_primary"]["choices"] in (
        ["a.safetensors", "b.safetensors", "c.safetensors"],
        [[name, name] for name in ("a.safetensors", "b.safetensors", "c.safetensors")],
    )


def test_the_ui_code_uses_only_apis_gradio_4_still_has():
    source = "\n".join(p.read_text() for p in Path(tab_module.__file__).parent.glob("*.py"))
    assert not re.search(r"gr\.\w+\.update\(", source), "component .update class methods are gone in gradio 4"
    assert "_js=" not in source, "_js is passed only through _page_hook, which falls back to js"
