"""What the tab and the API share: requests from named fields, merges as host jobs, cancel, metadata."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import make

from lib_merge import actions
from lib_merge.errors import CancelledError, RequestError


def fields(**overrides):
    return {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", **overrides}


def test_request_from_fields_refuses_an_unknown_field_by_name():
    with pytest.raises(RequestError, match="multiplyer: unknown field"):
        actions.request_from_fields(fields(multiplyer=0.5))


def test_request_from_fields_needs_a_primary_model():
    with pytest.raises(RequestError, match="primary_model_name"):
        actions.request_from_fields(fields(primary_model_name=""))


def test_cancel_stops_the_merge_and_leaves_no_file(host, models):
    request, _ = actions.request_from_fields(fields(custom_name="cancelled"))
    updates = []

    def cancel_after_the_first_tensor(update):
        updates.append(update)
        assert host.interrupt("page-1")  # what the Cancel button of the page that started it calls

    with pytest.raises(CancelledError):
        actions.run_merge(host, request, load=False, owner="page-1", on_progress=cancel_after_the_first_tensor)
    assert updates, "the merge reported no progress before it was cancelled"
    assert sorted(p.name for p in models.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    # The cancel belonged to that job: the next merge runs to the end.
    outcome = actions.run_merge(host, request, load=False)
    assert outcome.path == models / "cancelled.safetensors" and outcome.path.is_file()


def test_merges_wait_for_each_other(host):
    """The host's job slot: a second merge starts only when the first has left it."""
    entered = threading.Event()
    release = threading.Event()
    order = []

    def hold_the_slot():
        with host.job():
            entered.set()
            release.wait(10)
            order.append("first job done")

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    entered.wait(10)
    request, _ = actions.request_from_fields(fields(custom_name="second"))
    merging = threading.Thread(target=lambda: order.append(actions.run_merge(host, request, load=False).title))
    merging.start()
    merging.join(0.5)
    assert merging.is_alive() and order == []
    release.set()
    holder.join(10)
    merging.join(30)
    assert order == ["first job done", "second.safetensors"]


def test_a_folder_host_does_not_load_and_says_so_in_the_outcome(host):
    request, load = actions.request_from_fields(fields(load=True))
    outcome = actions.run_merge(host, request, load=load)
    assert load is True and outcome.loaded is False
    assert outcome.message().startswith("Saved: 0.7(a) + 0.3(b).safetensors")
    assert outcome.sha256 in outcome.message()


def test_preflight_reports_a_plannable_merge_and_refuses_an_unreadable_one(host, models):
    request, _ = actions.request_from_fields(fields())
    ok, report = actions.preflight_report(host, request)
    assert ok and "0.7(a) + 0.3(b).safetensors" in report
    (models / "junk.safetensors").write_bytes(b"nonsense")
    request, _ = actions.request_from_fields(fields(secondary_model_name="junk.safetensors"))
    ok, report = actions.preflight_report(host, request)
    assert not ok and report.startswith("Refused") and "junk.safetensors" in report


def test_read_metadata_merges_the_picks_later_ones_winning(host, models):
    make(models / "m1.safetensors", seed=5, metadata={"author": "one", "ss_steps": "10"})
    make(models / "m2.safetensors", seed=6, metadata={"author": "two"})
    merged = json.loads(actions.read_metadata(host, ["m1.safetensors", "m2.safetensors", ""]))
    assert merged == {"author": "two", "ss_steps": "10"}


def test_preflight_reads_headers_only_and_leaves_hashing_to_the_merge(host, monkeypatch):
    hashed = []
    real_sha256 = host.sha256
    monkeypatch.setattr(host, "sha256", lambda checkpoint: hashed.append(checkpoint.name) or real_sha256(checkpoint))
    request, _ = actions.request_from_fields(fields())
    assert actions.preflight_report(host, request)[0]
    assert hashed == []  # an SDXL input is 7 GB: a preflight on every pick must not read it whole
    actions.run_merge(host, request, load=False)
    assert sorted(hashed) == ["a.safetensors", "b.safetensors"]  # the recipe's input hashes


def test_a_cancel_from_another_page_or_client_does_not_stop_the_merge(host, models):
    request, _ = actions.request_from_fields(fields(custom_name="not-mine"))
    answers = []

    def others_press_cancel(update):
        answers.extend([host.interrupt("page-2"), host.interrupt("")])

    outcome = actions.run_merge(host, request, load=False, owner="page-1", on_progress=others_press_cancel)
    assert answers and not any(answers)
    assert outcome.path == models / "not-mine.safetensors" and outcome.path.is_file()
    assert not host.interrupt("page-1")  # and once it is done, its owner has nothing left to stop
