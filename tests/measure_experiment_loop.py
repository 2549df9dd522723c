"""Measures the experiment loop in a real webui v1.10.1 or Forge against what it replaces (issue: the loop).

    .venv/bin/python tests/measure_experiment_loop.py --webui /path/to/webui      # starts and stops it
    .venv/bin/python tests/measure_experiment_loop.py --forge /path/to/forge/webui  # the same in Forge
    .venv/bin/python tests/measure_experiment_loop.py --url http://127.0.0.1:7861  # one already running

Without either (or MERGE_LAB_WEBUI) it says it is skipped and exits 0, so CI, which has no webui,
runs it as a no-op. With --webui it clones this repository's HEAD into the webui's extensions (as
"Install from URL" does) and starts it with ../shared/webui-offline/start.sh (--forge:
../shared/forge-offline/start.sh). Forge loads a picked model at the next image, not when it is
picked: the switch figure includes that image either way, and before a Try an image is made with
rand_a so that it is loaded, as the webui has it loaded after picking it. The host needs
rand_a and rand_b checkpoints (the kit's), and is left on rand_a.

Same image settings everywhere (txt2img, 64x64, 2 steps, fixed seed). Medians of --repeats runs:
  try    = POST /merge-lab/v1/try (rand_a loaded, a new alpha each time) + txt2img, over
  switch = switching the loaded model rand_a -> rand_b (options) + txt2img;      target <= 1.5x
  sweep5 = POST /merge-lab/v1/sweep over 5 alphas, over sweep1 = the same sweep over 1 alpha;
                                                                                    target <= 5x + 10%
Before the medians, the first clicks after the start, the ones people judge: the first switch to
rand_b + txt2img, then (rand_a loaded again) the first Try + txt2img, with the Try's own breakdown.
--cold drops the page cache before each (root only), so each reads its files from the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KITS = {"webui": ROOT.parent / "shared" / "webui-offline", "forge": ROOT.parent / "shared" / "forge-offline"}
IMAGE = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
MODELS = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--webui", default=os.environ.get("MERGE_LAB_WEBUI"), help="a webui folder to start")
    parser.add_argument("--forge", default=os.environ.get("MERGE_LAB_FORGE"), help="a Forge folder to start")
    parser.add_argument("--url", help="a webui or Forge already running, with Merge Lab installed")
    parser.add_argument("--port", type=int, help="default 7861 (webui) or 7871 (Forge)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each first click (root)")
    args = parser.parse_args()
    if not (args.url or args.webui or args.forge):
        print("skipped: give --webui PATH (or MERGE_LAB_WEBUI), --forge PATH (MERGE_LAB_FORGE) or --url")
        return 0
    kit = KITS["forge" if args.forge and not args.webui else "webui"]
    port = args.port or (7871 if kit == KITS["forge"] else 7861)
    url = args.url or f"http://127.0.0.1:{port}"
    started = None if args.url else start(kit, Path(args.webui or args.forge), port)
    try:
        figures = measure(url, args.repeats, args.cold)
    finally:
        if started is not None:
            subprocess.run(["bash", str(kit / "stop.sh"), str(started)], check=False)
    report(figures)
    return 0


def start(kit: Path, webui: Path, port: int) -> Path:
    extension = webui / "extensions" / "merge-lab"
    shutil.rmtree(extension, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(extension)], check=True)
    subprocess.run(["bash", str(kit / "start.sh"), str(webui), str(port)], check=True)
    return webui


def measure(url: str, repeats: int, cold: bool = False) -> dict[str, list[float]]:
    def timed(path: str, body: dict) -> float:
        began = time.perf_counter()
        answers[path] = call(url, path, body)
        return time.perf_counter() - began

    def select(name: str) -> float:
        """Picking a checkpoint: the webui loads it there, Forge at the next image (which is timed too)."""
        return timed("/sdapi/v1/options", {"sd_model_checkpoint": name})

    def loaded(name: str) -> None:
        """``name`` loaded as after generating with it, before a Try: in Forge, an image loads it."""
        select(name)
        if forge:
            timed("/sdapi/v1/txt2img", IMAGE)

    answers: dict[str, dict] = {}
    forge = "forge_preset" in get(url, "/sdapi/v1/options")  # Forge loads a picked model lazily
    figures: dict[str, list[float]] = {"switch": [], "try": [], "sweep1": [], "sweep5": []}
    loaded("rand_a.safetensors")
    timed("/sdapi/v1/txt2img", IMAGE)  # warm-up: first-image costs are not the loop's
    drop_page_cache(cold)
    first_switch = select("rand_b.safetensors") + timed("/sdapi/v1/txt2img", IMAGE)
    loaded("rand_a.safetensors")
    drop_page_cache(cold)
    first_try = timed("/merge-lab/v1/try", {**MODELS, "multiplier": 0.29})
    breakdown = answers["/merge-lab/v1/try"].get("timings", {})
    figures["first switch"] = [first_switch]
    figures["first try"] = [first_try + timed("/sdapi/v1/txt2img", IMAGE)]
    print(f"first Try: {first_try:.2f} s ({', '.join(f'{k} {v:.2f} s' for k, v in breakdown.items())})")
    for repeat in range(repeats):
        loaded("rand_a.safetensors")
        figures["switch"].append(select("rand_b.safetensors") + timed("/sdapi/v1/txt2img", IMAGE))
        loaded("rand_a.safetensors")
        alpha = 0.31 + repeat / 100  # a new recipe each time: a repeated one costs nothing
        figures["try"].append(
            timed("/merge-lab/v1/try", {**MODELS, "multiplier": alpha}) + timed("/sdapi/v1/txt2img", IMAGE)
        )
        sweep = {**MODELS, **IMAGE, "x_param": "alpha"}
        figures["sweep1"].append(timed("/merge-lab/v1/sweep", {**sweep, "x_values": f"{alpha + 0.2:.2f}"}))
        figures["sweep5"].append(timed("/merge-lab/v1/sweep", {**sweep, "x_values": "0.1, 0.3, 0.5, 0.7, 0.9"}))
    select("rand_a.safetensors")
    return figures


def drop_page_cache(cold: bool) -> None:
    """With --cold: every file is read from the disk again, as after a reboot (needs root)."""
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as response:
        return json.load(response)


def call(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.load(response)


def report(figures: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in figures.items()}
    for name, values in figures.items():
        print(f"{name:7s} median {median[name]:6.2f} s   runs: {', '.join(f'{v:.2f}' for v in values)}")
    first_ratio = median["first try"] / median["first switch"]
    print(f"First click: Try -> first image / switch + generate: {first_ratio:.2f}x")
    try_ratio = median["try"] / median["switch"]
    sweep_ratio = median["sweep5"] / median["sweep1"]
    print(f"Try -> first image / switch + generate: {try_ratio:.2f}x (target <= 1.5x)")
    print(f"5-point sweep / 1-point sweep: {sweep_ratio:.2f}x (target <= 5.5x: 5x + 10%)")


if __name__ == "__main__":
    sys.exit(main())
