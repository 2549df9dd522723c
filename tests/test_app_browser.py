"""The standalone app (`python -m lib_merge.app`) driven in a real headless Chromium, as a user drives it.

The server is the real command in a subprocess, over real safetensors files in a temp folder; the
browser is Debian's chromium through Playwright. Outside CI the tests skip when chromium is missing;
in CI (CI=true) a missing browser is a failure, never a silent skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import make

from lib_merge import FolderHost
from lib_merge.recipe import VERSION, MergeNode, ModelRef, dump_recipe, request_from_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
# Set MERGE_LAB_SCREENSHOTS=docs to refresh the README's screenshot from this run.
SCREENSHOTS = os.environ.get("MERGE_LAB_SCREENSHOTS")

playwright = pytest.importorskip("playwright.sync_api")
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("chromium is not installed; .ci/run installs it with apt-get")
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app serving a folder with two good checkpoints and one that is not a checkpoint at all."""
    folder = tmp_path_factory.mktemp("app") / "models"
    make(folder / "alpha.safetensors", seed=1)
    make(folder / "beta.safetensors", seed=2)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(folder.parent / "cache")}  # keep the user's hash cache out of it
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_merge.app", "--models", str(folder), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_announcement(server)
        yield folder, f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_announcement(server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            break
        seen.append(line)
        if line.startswith("Merge Lab: http://"):
            return
    raise AssertionError("the app did not start:\n" + "".join(seen))


@pytest.fixture
def page(served):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.goto(served[1])
        tab.wait_for_selector("#merge_lab_merge")
        yield tab
        browser.close()


def pick(page, elem_id: str, name: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} ul.options li", has_text=name).first.click()


def choices(page, elem_id: str) -> list[str]:
    page.locator(f"#{elem_id} input").click()
    options = page.locator(f"#{elem_id} ul.options li").all_inner_texts()
    page.keyboard.press("Escape")
    return [option.strip() for option in options]


def value(page, elem_id: str) -> str:
    """What a text box, number or slider (its number box) shows."""
    return page.locator(f"#{elem_id} input[type=number], #{elem_id} textarea, #{elem_id} input").first.input_value()


def write_recipe(path: Path, method: str, models: list[str], params: dict, blocks: dict, output: dict) -> Path:
    node = MergeNode(method, tuple(ModelRef(name) for name in models), params, blocks)
    path.write_text(dump_recipe({"merge_lab_recipe": VERSION, "merge": node.to_dict(), "output": output}))
    return path


def upload_recipe(page, path: Path) -> str:
    """Open the Recipe accordion, give ``path`` to Load recipe and return the note it leaves."""
    page.locator("#merge_lab_recipe").get_by_text("Recipe", exact=True).click()
    # gradio 3 puts the hidden file input just before the button, gradio 4 inside it.
    upload = page.locator("#merge_lab_load_recipe input[type=file], input[type=file]:has(+ #merge_lab_load_recipe)")
    upload.set_input_files(path)
    # The markdown's own text, not the block's: its status timer ("0.2s") would read as text too.
    note = "#merge_lab_recipe_note .md"
    page.wait_for_function(f"() => document.querySelector('{note}').innerText.trim() !== ''")
    return page.locator(note).first.inner_text().strip()


@pytest.mark.gradio_both
def test_pick_two_merge_and_see_the_result_in_the_dropdowns_and_on_disk(page, served):
    folder, _ = served
    pick(page, "merge_lab_primary", "alpha.safetensors")
    pick(page, "merge_lab_secondary", "beta.safetensors")
    preflight = page.locator("#merge_lab_preflight textarea")
    page.wait_for_function(
        "() => document.querySelector('#merge_lab_preflight textarea').value.includes('0.7(alpha) + 0.3(beta)')"
    )
    assert "SD1" in preflight.input_value()

    page.locator("#merge_lab_merge").click()
    done = page.locator("#merge_lab_result .merge-lab-done")
    done.wait_for(timeout=60_000)
    assert "Saved: 0.7(alpha) + 0.3(beta).safetensors" in done.inner_text()
    assert (folder / "0.7(alpha) + 0.3(beta).safetensors").is_file()
    for elem_id in ("merge_lab_primary", "merge_lab_secondary", "merge_lab_tertiary"):
        assert "0.7(alpha) + 0.3(beta).safetensors" in choices(page, elem_id)
    if SCREENSHOTS:
        page.screenshot(path=str(ROOT / SCREENSHOTS / "merge-lab-tab.png"))


def test_a_bad_pick_is_refused_in_the_tab_and_writes_nothing(page, served):
    folder, _ = served
    before = sorted(p.name for p in folder.iterdir())
    pick(page, "merge_lab_primary", "alpha.safetensors")
    pick(page, "merge_lab_secondary", "broken.safetensors")
    page.wait_for_function("() => document.querySelector('#merge_lab_preflight textarea').value.startsWith('Refused')")
    assert "broken.safetensors" in page.locator("#merge_lab_preflight textarea").input_value()

    page.locator("#merge_lab_merge").click()
    error = page.locator("#merge_lab_result .merge-lab-error")
    error.wait_for(timeout=60_000)
    assert "broken.safetensors" in error.inner_text()
    assert "Traceback" not in error.inner_text()
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.gradio_both
def test_ties_with_a_block_preset_its_chart_and_a_saved_recipe(page, served):
    folder, _ = served
    page.get_by_role("radio", name="TIES", exact=True).check()
    page.wait_for_selector("#merge_lab_param_density", state="visible")
    assert page.locator("#merge_lab_param_t").is_hidden()  # SLERP's t is not TIES's
    pick(page, "merge_lab_primary", "alpha.safetensors")
    pick(page, "merge_lab_secondary", "beta.safetensors")
    page.locator("#merge_lab_blocks").get_by_text("Block weights").click()
    pick(page, "merge_lab_block_param", "lambda")
    pick(page, "merge_lab_block_preset", "ramp_in_out")
    # The preset fills the text and the text redraws the chart: two events, so wait for both.
    page.wait_for_function(
        "() => document.querySelector('#merge_lab_block_text textarea, #merge_lab_block_text input').value"
        " === 'ramp_in_out'"
    )
    ramp_drawn = """() => {
        const values = [...document.querySelectorAll('#merge_lab_block_chart svg rect title')]
            .map(title => title.textContent.split(': ')[1]);
        return values.length === 26 && new Set(values).size > 2;
    }"""
    page.wait_for_function(ramp_drawn)
    page.wait_for_function(
        "() => document.querySelector('#merge_lab_preflight textarea').value.includes('lambda per block')"
    )
    page.locator("#merge_lab_merge").click()
    done = page.locator("#merge_lab_result .merge-lab-done")
    done.wait_for(timeout=60_000)
    assert "ties(alpha, beta).safetensors" in done.inner_text()
    assert (folder / "ties(alpha, beta).safetensors").is_file()

    page.locator("#merge_lab_recipe").get_by_text("Recipe", exact=True).click()
    page.locator("#merge_lab_save_recipe").click()
    link = page.locator("#merge_lab_recipe_file a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    text = Path(download.value.path()).read_text()
    assert "method: ties" in text and "lambda: ramp_in_out" in text and "alpha.safetensors" in text
    if SCREENSHOTS:
        page.screenshot(path=str(ROOT / SCREENSHOTS / "merge-lab-blocks.png"), full_page=True)


# From another method, the method's change event (which resets the parameters to their defaults)
# fires after the load: the loaded values must survive it.
@pytest.mark.parametrize(
    "shown", ["TIES", pytest.param("Weighted sum", id="from-the-default-method", marks=pytest.mark.gradio_both)]
)
def test_load_recipe_fills_the_controls_and_the_preflight_follows(page, served, tmp_path, shown):
    recipe = write_recipe(
        tmp_path / "ties.yaml", "ties", ["beta.safetensors", "alpha.safetensors"],
        {"density": 0.35, "lambda": 0.8}, {"lambda": "IN*=0.5"}, {"custom_name": "from-recipe"},
    )  # fmt: skip
    request_from_recipe(yaml.safe_load(recipe.read_text()))  # a recipe the engine itself accepts
    page.get_by_role("radio", name=shown, exact=True).check()
    if shown == "TIES":  # the method's defaults, which the recipe's values differ from
        page.wait_for_function(
            "() => document.querySelector('#merge_lab_preflight textarea').value.startsWith('Pick 2')"
        )
        assert (value(page, "merge_lab_param_density"), value(page, "merge_lab_block_param")) == ("0.2", "density")

    assert upload_recipe(page, recipe) == "Recipe loaded."
    page.wait_for_function("() => document.querySelector('#merge_lab_preflight textarea').value.includes(' over A, B')")
    assert page.get_by_role("radio", name="TIES", exact=True).is_checked()
    assert page.locator("#merge_lab_param_density").is_visible()
    assert value(page, "merge_lab_primary") == "beta.safetensors"
    assert value(page, "merge_lab_secondary") == "alpha.safetensors"
    assert value(page, "merge_lab_custom_name") == "from-recipe"
    assert value(page, "merge_lab_block_text") == "IN*=0.5"
    assert float(value(page, "merge_lab_param_density")) == 0.35
    assert float(value(page, "merge_lab_param_lambda")) == 0.8
    assert value(page, "merge_lab_block_param") == "lambda"
    preflight = page.locator("#merge_lab_preflight textarea").input_value()
    assert "Method: TIES (density 0.35, lambda 0.8, lambda per block) over A, B" in preflight, preflight
    assert "A: beta.safetensors" in preflight and "from-recipe.safetensors" in preflight, preflight


def test_a_recipe_with_an_unknown_method_is_named_and_changes_nothing(page, served, tmp_path):
    pick(page, "merge_lab_primary", "alpha.safetensors")
    pick(page, "merge_lab_secondary", "beta.safetensors")
    good = write_recipe(
        tmp_path / "good.yaml", "ties", ["beta.safetensors", "alpha.safetensors"],
        {"density": 0.35}, {}, {"custom_name": "from-recipe"},
    )  # fmt: skip
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(good.read_text().replace("method: ties\n", "method: ties-plus\n"))
    assert "method: ties-plus\n" in recipe.read_text()

    note = upload_recipe(page, recipe)
    assert note.startswith("Could not load the recipe") and "unknown merge method" in note and "ties-plus" in note, note
    assert page.get_by_role("radio", name="Weighted sum", exact=True).is_checked()
    assert value(page, "merge_lab_primary") == "alpha.safetensors"
    assert value(page, "merge_lab_secondary") == "beta.safetensors"
    assert float(value(page, "merge_lab_multiplier")) == 0.3
    assert value(page, "merge_lab_custom_name") == ""


def test_behind_auth_the_browser_logs_in_once_and_the_whole_tab_works(tmp_path):
    """--auth protects every route, gradio's queue websocket included: the tab still merges and
    loads a recipe in a real browser that was given the credentials, and shows nothing without them."""
    folder = tmp_path / "models"
    make(folder / "alpha.safetensors", seed=1)
    make(folder / "beta.safetensors", seed=2)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_merge.app", "--models", str(folder), "--port", str(port),
         "--auth", "alice:Grüße aus Köln"],
        cwd=ROOT, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for_announcement(server)
        url = f"http://127.0.0.1:{port}/"
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            stranger = browser.new_page()  # no credentials: chromium gives up on the login challenge
            with pytest.raises(playwright.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
                stranger.goto(url)
            assert stranger.request.get(url).status == 401
            context = browser.new_context(http_credentials={"username": "alice", "password": "Grüße aus Köln"})
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#merge_lab_merge")
            pick(page, "merge_lab_primary", "alpha.safetensors")
            pick(page, "merge_lab_secondary", "beta.safetensors")
            page.locator("#merge_lab_merge").click()
            page.locator("#merge_lab_result .merge-lab-done").wait_for(timeout=60_000)
            assert (folder / "0.7(alpha) + 0.3(beta).safetensors").is_file()
            recipe = write_recipe(tmp_path / "r.yaml", "soup", ["alpha.safetensors", "beta.safetensors"], {}, {}, {})
            assert upload_recipe(page, recipe) == "Recipe loaded."
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cancel_on_another_page_does_not_stop_this_pages_merge(page, served, tmp_path):
    """Two browser pages on one app: the second's Cancel is not for the first's merge (a page's
    jobs belong to it); the first's own Cancel, pressed with nothing running, stops nothing later."""
    folder, url = served
    other = page.context.browser.new_page()  # someone else's page
    other.goto(url)
    other.wait_for_selector("#merge_lab_merge")
    other.locator("#merge_lab_cancel").click()  # nothing of this page's is running: it is a no-op
    pick(page, "merge_lab_primary", "alpha.safetensors")
    pick(page, "merge_lab_secondary", "beta.safetensors")
    page.locator("#merge_lab_custom_name textarea").fill("not-cancelled")
    page.locator("#merge_lab_merge").click()
    other.locator("#merge_lab_cancel").click()
    page.locator("#merge_lab_result .merge-lab-done").wait_for(timeout=60_000)
    assert (folder / "not-cancelled.safetensors").is_file()
    other.close()


class OwnerNotingHost(FolderHost):
    """A folder host that notes the owner (the page) of each job and each Cancel it is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noted: list[tuple[str, str]] = []

    def job(self, task_id: str = "", jobs: int = 1, owner: str = ""):
        self.noted.append(("job", owner))
        return super().job(task_id, jobs, owner)

    def interrupt(self, owner: str) -> bool:
        self.noted.append(("cancel", owner))
        return super().interrupt(owner)


@contextlib.contextmanager
def served_in_process(host):
    """The app over ``host`` in this process (so the test sees the host), on a free port."""
    import uvicorn

    from lib_merge.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(host), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.gradio_both
def test_a_page_keeps_one_owner_across_its_events_and_each_page_has_its_own(tmp_path):
    """The tab keeps its page's owner id in a gr.State, set in place at the first event: every later
    event of that page (queued, like Merge, or not, like Cancel) must see the same id, another page
    or a reload another one. gradio 3 and 4 must both hand each event the page's same state object."""
    folder = tmp_path / "models"
    make(folder / "alpha.safetensors", seed=1)
    make(folder / "beta.safetensors", seed=2)
    host = OwnerNotingHost(folder, hash_cache=tmp_path / "hashes.json", device="cpu")

    def noted_after(action) -> tuple[str, str]:
        count = len(host.noted)
        action()
        deadline = time.monotonic() + 30
        while len(host.noted) == count:
            assert time.monotonic() < deadline, "the event did not reach the host"
            time.sleep(0.05)
        return host.noted[count]

    with served_in_process(host) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        first, second = browser.new_page(), browser.new_page()
        for page in (first, second):
            page.goto(url)
            page.wait_for_selector("#merge_lab_merge")
        cancel = first.locator("#merge_lab_cancel")
        mine = [noted_after(cancel.click), noted_after(cancel.click)]
        pick(first, "merge_lab_primary", "alpha.safetensors")
        pick(first, "merge_lab_secondary", "beta.safetensors")
        mine.append(noted_after(first.locator("#merge_lab_merge").click))
        first.locator("#merge_lab_result .merge-lab-done").wait_for(timeout=60_000)
        mine.append(noted_after(cancel.click))
        other = noted_after(second.locator("#merge_lab_cancel").click)
        first.reload()
        first.wait_for_selector("#merge_lab_merge")
        reloaded = noted_after(first.locator("#merge_lab_cancel").click)
        browser.close()

    assert [kind for kind, _ in mine] == ["cancel", "cancel", "job", "cancel"]
    owners = {owner for _, owner in mine}
    assert len(owners) == 1 and "" not in owners, mine
    assert other[1] not in owners and reloaded[1] not in owners and other[1] != reloaded[1]


def test_the_line_under_the_method_says_exactly_which_pickers_it_uses(page, served):
    about = page.locator("#merge_lab_method_about").last  # gradio 3 repeats the id inside the block
    expected = {
        "Weighted sum": "Uses A and B (C is not used).",
        "Add difference": "Uses A, B and C.",
        "No interpolation": "Uses A only (B and C are not used).",
        "TIES": "Uses base = A, then models = B, C and More models (at least 1).",
        "Model soup": "Uses models = A, B, C and More models (at least 2).",
    }
    for label, text in expected.items():
        page.get_by_role("radio", name=label, exact=True).check()
        page.wait_for_function(
            "t => document.querySelector('#merge_lab_method_about').innerText.includes(t)", arg=text, timeout=10_000
        )
        assert "then More models:" not in about.inner_text()
