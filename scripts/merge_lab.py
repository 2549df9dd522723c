"""Merge Lab in the webui: registers its tab, settings and API routes; the rest lives in lib_merge."""

from modules import script_callbacks

from lib_merge import webui_host

script_callbacks.on_ui_tabs(webui_host.on_ui_tabs)
script_callbacks.on_ui_settings(webui_host.on_ui_settings)
script_callbacks.on_app_started(webui_host.on_app_started)
