"""Merge Lab in the webui: registers its tab, settings, API routes and X/Y/Z plot axes; the rest lives in lib_merge."""

from modules import script_callbacks

from lib_merge.hosts import webui

script_callbacks.on_ui_tabs(webui.on_ui_tabs)
script_callbacks.on_ui_settings(webui.on_ui_settings)
script_callbacks.on_app_started(webui.on_app_started)
script_callbacks.on_before_ui(webui.on_before_ui)
