"""Forge's ``backend`` package (stand-in): ``state_dict.try_filter_state_dict`` only."""
