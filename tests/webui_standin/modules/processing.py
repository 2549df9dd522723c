"""modules/processing.py: StableDiffusionProcessingTxt2Img (keeps its fields) and process_images,
which here paints an image from the loaded model's weights and the seed, so images differ exactly
when weights or seed do, and writes an infotext naming the model as the webui's does."""

import hashlib

from PIL import Image

from modules import shared


class StableDiffusionProcessingTxt2Img:
    def __init__(self, **fields):
        self.scripts = None
        self.__dict__.update(fields)

    def close(self):
        pass


class Processed:
    def __init__(self, images, infotexts):
        self.images = images
        self.infotexts = infotexts


def process_images(p):
    model = shared.sd_model
    digest = hashlib.sha256(str(p.seed).encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    color = tuple(digest.digest()[:3])
    shared.state.job_no += 1
    info = model.sd_checkpoint_info
    infotext = (
        f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}, Model hash: {model.sd_model_hash}, Model: {info.name_for_extra}"
    )
    return Processed([Image.new("RGB", (p.width, p.height), color)], [infotext])
