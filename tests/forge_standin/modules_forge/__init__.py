"""Forge's ``modules_forge`` package (stand-in): only ``main_entry.checkpoint_change``."""
