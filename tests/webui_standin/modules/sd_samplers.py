"""modules/sd_samplers.py: visible_sampler_names (the names the txt2img tab offers)."""


def visible_sampler_names():
    return ["DPM++ 2M", "Euler a", "Euler"]
