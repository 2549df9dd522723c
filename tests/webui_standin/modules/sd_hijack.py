"""modules/sd_hijack.py: ``model_hijack.hijack(model)`` / ``undo_hijack(model)``, which in the webui
wrap and unwrap the text encoder (its keys move under ``.wrapped``); here they record the calls."""


class ModelHijack:
    def __init__(self):
        self.calls: list[str] = []

    def hijack(self, model):
        self.calls.append("hijack")

    def undo_hijack(self, model):
        self.calls.append("undo_hijack")


model_hijack = ModelHijack()
