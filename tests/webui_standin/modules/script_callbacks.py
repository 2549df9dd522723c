"""modules/script_callbacks.py: the three registrations scripts/merge_lab.py makes."""

registered: dict[str, list] = {"ui_tabs": [], "ui_settings": [], "app_started": []}


def on_ui_tabs(callback, *, name=None):
    registered["ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    registered["ui_settings"].append(callback)


def on_app_started(callback, *, name=None):
    registered["app_started"].append(callback)
