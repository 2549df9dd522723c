"""modules/images.py: image_grid (rows given), GridAnnotation, draw_grid_annotations (a label
margin above and left of the grid), save_image (a PNG with the infotext under "parameters")."""

import os

from PIL import Image, PngImagePlugin

from modules import shared


class GridAnnotation:
    def __init__(self, text="", is_active=True):
        self.text = text
        self.is_active = is_active


def image_grid(imgs, batch_size=1, rows=None):
    cols = -(-len(imgs) // rows)
    width, height = imgs[0].size
    grid = Image.new("RGB", (cols * width, rows * height), shared.opts.grid_background_color)
    for index, img in enumerate(imgs):
        grid.paste(img, (index % cols * width, index // cols * height))
    return grid


def draw_grid_annotations(im, width, height, hor_texts, ver_texts, margin=0):
    annotated = Image.new("RGB", (im.width + width // 2, im.height + height // 2), "white")
    annotated.paste(im, (width // 2, height // 2))
    annotated.labels = ([t[0].text for t in hor_texts], [t[0].text for t in ver_texts])  # for the tests to read
    return annotated


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, grid=False, p=None, **_):
    os.makedirs(path, exist_ok=True)
    filename = os.path.join(path, f"{len(os.listdir(path)):05d}-{basename}.{extension}")
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", info or "")
    image.save(filename, pnginfo=pnginfo)
    return filename, None
