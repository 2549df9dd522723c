"""modules/devices.py: the device the webui generates on, and torch_gc."""

import torch

device = torch.device("cpu")
gc_calls = 0
fp8 = False  # the webui sets it when the model is held in float8


def torch_gc():
    global gc_calls
    gc_calls += 1
