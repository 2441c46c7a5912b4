"""The review page in a real browser: Playwright driving the system's chromium (Debian's package).

A reviewer opens the queue, sees each digit as an image, accepts one proposal with the keyboard and
relabels another; the store must then hold both decisions with the reviewer's name and note, as
audit events. Outside CI the test skips when chromium or playwright is missing; with CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _require_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if not os.path.exists(CHROMIUM):
        missing.append("chromium (apt-get install -y chromium)")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test but lacks {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture
def server(digits_store):
    """The review page over a copy of the digits store with self-influence proposals, on a free port."""
    from werkzeug.serving import make_server

    from influence_store.curation import propose
    from influence_store.web import create_app

    store, run_id = digits_store
    propose(store, run_id, rule="self-influence", top=6, actor="rule-bot")
    httpd = make_server("127.0.0.1", 0, create_app(store, reviewer="nobody-yet"), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield store, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)


def test_reviewer_accepts_with_the_keyboard_and_relabels_in_the_browser(server, tmp_path):
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    store, url = server
    first, second = store.proposals()[:2]
    examples = store.examples([first["example_id"], second["example_id"]])
    true_label = examples[second["example_id"]]["payload"]["original_label"]
    assert true_label != second["label"]  # the top self-influence examples are flipped labels

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url + "/")
            cards = page.locator(".card[data-id]")
            expect(cards).to_have_count(6)
            image = cards.first.locator("img.example")
            expect(image).to_be_visible()
            # the digit was decoded by the browser: a real picture, not a broken image
            assert page.evaluate("(img) => img.complete && img.naturalWidth", image.element_handle()) >= 8

            page.fill("#reviewer", "ann")
            page.click("#reviewer-form button")
            expect(page.locator("#reviewer")).to_have_value("ann")
            page.screenshot(path=str(tmp_path / "queue.png"), full_page=False)

            # proposal 1 is selected: type a note, leave the field, accept with the keyboard
            page.locator(f"#proposal-{first['id']} input[name=note]").fill("flipped label, remove")
            page.keyboard.press("Escape")
            page.keyboard.press("a")
            page.wait_for_load_state("load")
            expect(page.locator(f"#proposal-{first['id']}")).to_have_count(0)  # left the 'proposed' queue

            # the next proposal is now first: relabel it to its true label
            card = page.locator(f"#proposal-{second['id']}")
            expect(card).to_have_class("card selected")
            card.locator("input[name=note]").fill("clearly the true digit")
            card.locator("input[name=new_label]").fill(str(true_label))
            card.locator("input[name=new_label]").press("Enter")
            page.wait_for_load_state("load")
            expect(page.locator(f"#proposal-{second['id']}")).to_have_count(0)

            page.goto(url + "/?status=accepted")
            expect(page.locator(".card[data-id]")).to_have_count(2)
            page.screenshot(path=str(tmp_path / "accepted.png"), full_page=True)
        finally:
            browser.close()

    shots = os.environ.get("INFLUENCE_STORE_SCREENSHOTS")  # keep the pictures to look at them
    if shots:
        for name in ("queue.png", "accepted.png"):
            shutil.copy(tmp_path / name, os.path.join(shots, name))
    assert (tmp_path / "queue.png").stat().st_size > 1000

    accepted, relabelled = store.proposals(ids=[first["id"], second["id"]])
    assert (accepted["status"], accepted["outcome"], accepted["reviewer"], accepted["note"]) == (
        "accepted", "remove", "ann", "flipped label, remove")
    assert (relabelled["status"], relabelled["outcome"], relabelled["new_label"], relabelled["reviewer"],
            relabelled["note"]) == ("accepted", "relabel", true_label, "ann", "clearly the true digit")
    events = store.proposal_events(second["id"])
    assert [(e["from"], e["to"], e["actor"], e["new_label"]) for e in events] == [
        (None, "proposed", "rule-bot", None), ("proposed", "accepted", "ann", true_label)]
    # untouched proposals stay proposed
    assert {p["status"] for p in store.proposals()[2:]} == {"proposed"}
