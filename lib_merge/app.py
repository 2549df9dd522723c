"""Standalone Merge Lab: the webui's tab and API over a folder of checkpoints, with plain gradio.

python -m lib_merge.app --models DIR [--port N]
python -m lib_merge.app --demo [--port N]      # small SD1.5-layout checkpoints A, B, C in a temp folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .host import FolderHost

DEMO_MODELS = (("demo_a", 1), ("demo_b", 2), ("demo_c", 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_merge.app", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder of .safetensors / .ckpt checkpoints")
    parser.add_argument("--demo", action="store_true", help="serve small demo checkpoints made in a temp folder")
    parser.add_argument("--output", type=Path, help="where merges go (default: the models folder)")
    parser.add_argument("--vae-dir", type=Path, help="folder of VAEs that can be baked in")
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--listen", default="127.0.0.1", help="address to serve on (default: this machine only)")
    args = parser.parse_args(argv)
    if args.demo:
        args.models = make_demo(Path(tempfile.mkdtemp(prefix="merge-lab-demo-")))
    if args.models is None or not args.models.is_dir():
        parser.error(f"--models: {args.models} is not a folder" if args.models else "give --models DIR or --demo")
    host = FolderHost(args.models, output_dir=args.output, vae_dir=args.vae_dir)
    serve(host, args.listen, args.port)
    return 0


def make_demo(folder: Path) -> Path:
    """Small checkpoints with the real SD1.5 key names (scaled-down shapes, random values)."""
    from . import synthetic

    specs = synthetic.scaled(synthetic.layout("sd15"), max_dim=64)
    for name, seed in DEMO_MODELS:
        synthetic.write_checkpoint(folder / f"{name}.safetensors", specs, seed)
    return folder


def create_app(host: FolderHost):
    """A FastAPI app serving the tab at / and the API under /merge-lab/v1."""
    import gradio as gr
    from fastapi import FastAPI

    from .api import add_routes
    from .ui.tab import build_tab

    app = FastAPI(title="Merge Lab")
    add_routes(app, host)
    return gr.mount_gradio_app(app, build_tab(host).queue(), path="/")


def serve(host: FolderHost, listen: str, port: int) -> None:
    import uvicorn

    app = create_app(host)

    @app.on_event("startup")
    def announce() -> None:
        print(f"Merge Lab: http://{listen}:{port}/ serving {host.models_dir}", flush=True)

    uvicorn.run(app, host=listen, port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
