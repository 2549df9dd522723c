"""Merge Lab in the webui or in Forge: picks the host, then registers the tab, settings, API routes and
X/Y/Z plot axes over it; the rest lives in lib_merge."""

from modules import sd_models

from lib_merge.hosts import webui

if hasattr(sd_models, "forge_model_reload"):  # Forge loads models its own way (sd_models.load_model is a stub)
    from lib_merge.hosts.forge import ForgeHost as Host
else:
    Host = webui.WebuiHost

webui.register_callbacks(Host)
