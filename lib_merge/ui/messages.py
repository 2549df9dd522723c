"""The result panel's HTML: a done message (its data attributes tell the page script what to do
next) or an error, preformatted so long paths wrap instead of widening the panel."""

from __future__ import annotations

import html


def done_html(
    message: str, *, title: str = "", loaded: bool = False, open_txt2img: bool = False, lora: bool = False
) -> str:
    """``lora``: a LoRA file was written, so the page script refreshes the host's Lora cards."""
    data = f' data-title="{html.escape(title)}" data-loaded="{int(loaded)}" data-open="{int(open_txt2img)}"'
    data += f' data-lora="{int(lora)}"'
    return f'<div class="merge-lab-done"{data}>{pre(message)}</div>'


def error_html(message: str) -> str:
    return f'<div class="merge-lab-error" style="color: var(--error-text-color, #c00)">{pre(message)}</div>'


def pre(text: str) -> str:
    return f'<pre style="white-space: pre-wrap; overflow-wrap: anywhere">{html.escape(text)}</pre>'
