"""modules/script_callbacks.py: the four registrations scripts/merge_lab.py makes."""

registered: dict[str, list] = {"ui_tabs": [], "ui_settings": [], "app_started": [], "before_ui": []}


def on_ui_tabs(callback, *, name=None):
    registered["ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    registered["ui_settings"].append(callback)


def on_app_started(callback, *, name=None):
    registered["app_started"].append(callback)


def on_before_ui(callback, *, name=None):
    registered["before_ui"].append(callback)
