"""A stand-in for Forge's ``modules`` package, for tests of lib_merge.hosts.forge ONLY.

Forge (lllyasviel/stable-diffusion-webui-forge) cannot be installed from a package registry, so the
adapter's contract is tested against small modules that copy the behaviour it relies on, read from
Forge's source at dfdcbab: ``sd_models`` whose ``load_model``/``reload_model_weights`` do nothing,
whose ``checkpoint_tiles`` lists names, and whose ``forge_model_reload`` loads what
``modules_forge.main_entry.checkpoint_change`` selected, unless ``model_data.forge_hash`` says it is
loaded already. Everything Forge shares with the webui (shared, hashes, progress, the queue lock)
comes from ``tests/webui_standin/modules``. The real Forge is exercised by tests/test_forge_e2e.py
when MERGE_LAB_FORGE points at one.
"""

from pathlib import Path

# Forge's modules first (this folder), then the webui's stand-ins for what Forge kept unchanged.
__path__.append(str(Path(__file__).resolve().parents[2] / "webui_standin" / "modules"))
