"""Standalone Merge Lab: the webui's tab and API over a folder of checkpoints, with plain gradio.

python -m lib_merge.app --models DIR [--port N] [--listen ADDRESS --auth USER:PASS | --auth-file FILE]
python -m lib_merge.app --demo [--port N]      # small SD1.5-layout checkpoints A, B, C in a temp folder

Whoever reaches the app can merge in its folders, so it serves this machine only unless given
credentials: ``--listen`` on any other address without ``--auth`` / ``--auth-file`` refuses to start.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

from .auth import BasicAuthMiddleware, Credentials, parse_pair, read_auth_file
from .hosts import FolderHost
from .io.writer import remove_leftovers

DEMO_MODELS = (("demo_a", 1), ("demo_b", 2), ("demo_c", 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_merge.app", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder of .safetensors / .ckpt checkpoints")
    parser.add_argument("--demo", action="store_true", help="serve small demo checkpoints made in a temp folder")
    parser.add_argument("--output", type=Path, help="where merges go (default: the models folder)")
    parser.add_argument("--vae-dir", type=Path, help="folder of VAEs that can be baked in")
    parser.add_argument("--lora-dir", type=Path, help="folder of LoRAs to bake in; extracted and merged LoRAs go there")
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--listen", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--auth", help="USER:PASSWORD that the page and every API route require (HTTP basic)")
    parser.add_argument("--auth-file", type=Path, help="a file of USER:PASSWORD lines, one per user")
    args = parser.parse_args(argv)
    try:
        credentials = _credentials(args)
    except ValueError as err:
        parser.error(str(err))
    if credentials is None and not is_loopback(args.listen):
        parser.error(
            f"--listen {args.listen}: anyone who reaches that address could merge, read and overwrite checkpoints "
            "in your folders; add --auth USER:PASSWORD or --auth-file FILE (or serve on 127.0.0.1)"
        )
    if args.demo:
        args.models = make_demo(Path(tempfile.mkdtemp(prefix="merge-lab-demo-")))
    if args.models is None or not args.models.is_dir():
        parser.error(f"--models: {args.models} is not a folder" if args.models else "give --models DIR or --demo")
    host = FolderHost(args.models, output_dir=args.output, vae_dir=args.vae_dir, lora_dir=args.lora_dir)
    for folder in (host.output_dir(), args.lora_dir):  # temp files of merges that were killed (kill -9, a power cut)
        if folder is not None:
            remove_leftovers(folder)
    serve(host, args.listen, args.port, credentials)
    return 0


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _credentials(args) -> Credentials | None:
    credentials: Credentials = {}
    if args.auth:
        credentials.update([parse_pair(args.auth, "--auth")])
    if args.auth_file:
        credentials.update(read_auth_file(args.auth_file))
    return credentials or None


def make_demo(folder: Path) -> Path:
    """Small checkpoints with the real SD1.5 key names (scaled-down shapes, random values)."""
    from . import synthetic

    specs = synthetic.scaled(synthetic.layout("sd15"), max_dim=64)
    for name, seed in DEMO_MODELS:
        synthetic.write_checkpoint(folder / f"{name}.safetensors", specs, seed)
    return folder


def create_app(host: FolderHost, credentials: Credentials | None = None):
    """A FastAPI app serving the tab at / and the API under /merge-lab/v1; with ``credentials``,
    every request (page, API, websocket) needs them."""
    import gradio as gr
    from fastapi import FastAPI

    from .api import add_routes
    from .ui.tab import build_tab

    app = FastAPI(title="Merge Lab")
    add_routes(app, host)
    tab = build_tab(host).queue()
    app = gr.mount_gradio_app(app, tab, path="/")
    app.add_middleware(GradioFilesOnly)
    if credentials:
        # gradio 3's queue calls the app's own routes with this token (set by the mount); gradio 4's has none.
        queue_token = getattr(getattr(tab, "_queue", None), "access_token", "")
        app.add_middleware(BasicAuthMiddleware, credentials=credentials, internal_token=queue_token)
    return app


class GradioFilesOnly:
    """gradio 3 serves any file under the working folder at ``/file=PATH`` and at ``/file/PATH``;
    here it serves only the files gradio itself made (uploads, downloads, images), which live in
    its temp folder. (gradio 4 serves the same two routes and already refuses the working folder;
    the check stays, the same for both.)"""

    ROUTES = ("/file=", "/file/")

    def __init__(self, app):
        self.app = app
        self.folders = [
            Path(folder).resolve()
            for folder in {os.environ.get("GRADIO_TEMP_DIR"), str(Path(tempfile.gettempdir()) / "gradio")}
            if folder
        ]

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        route = next((route for route in self.ROUTES if path.startswith(route)), None)
        if route and not self._allowed(path.removeprefix(route)):
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"File not allowed."})
            return
        await self.app(scope, receive, send)

    def _allowed(self, name: str) -> bool:
        if name.startswith(("http://", "https://")):
            return True  # gradio answers these with a redirect, reading nothing
        try:
            target = Path(name).resolve()
        except (OSError, ValueError):
            return False
        return any(target.is_relative_to(folder) for folder in self.folders)


def serve(host: FolderHost, listen: str, port: int, credentials: Credentials | None = None) -> None:
    import uvicorn

    app = create_app(host, credentials)

    @app.on_event("startup")
    def announce() -> None:
        login = ", login required" if credentials else ""
        print(f"Merge Lab: http://{listen}:{port}/ serving {host.models_dir}{login}", flush=True)

    uvicorn.run(app, host=listen, port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
