"""The review page over HTTP (Flask's test client): the queue shows every example as an image, a
decision made on the page is the same proposal row and audit event as one made with `review`, and
cross-site or tokenless POSTs, foreign Host headers and off-site redirects are refused."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.curation import propose
from influence_store.web import create_app


@pytest.fixture
def page(digits_store):
    store, run_id = digits_store
    made = propose(store, run_id, rule="self-influence", top=5, actor="rule-bot")
    client = create_app(store, reviewer="ann").test_client()
    return store, made, client


def form_token(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_queue_shows_each_proposal_with_its_digit_and_the_tests_it_hurts(page):
    store, made, client = page
    html = client.get("/").get_data(as_text=True)
    cards = re.findall(r'<div class="card" data-id="(\d+)"', html)
    assert cards == [str(p["id"]) for p in made]
    from PIL import Image

    examples = store.examples(p["example_id"] for p in made)
    for p in made:  # the picture of each proposal is its own 8x8 pixels, scaled up
        card = html.split(f'id="proposal-{p["id"]}"')[1]
        data = re.search(r'<img class="example" alt="example [^"]+" src="data:image/png;base64,([^"]+)"', card).group(1)
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=float)
        pixels = np.asarray(examples[p["example_id"]]["payload"]["pixels"]).reshape(8, 8)
        step = image.shape[0] // 8
        assert np.abs(image[::step, ::step] / 255 - pixels).max() < 0.01
    hurt = store.most_hurt_tests(made[0]["run_id"], [made[0]["example_id"]], 3)[made[0]["example_id"]]
    first = html.split(f'id="proposal-{made[0]["id"]}"')[1].split('class="card"')[0]
    assert [t["key"] for t in hurt] == re.findall(r'alt="test ([^"]+)"', first)
    assert all(t["score"] < 0 for t in hurt)


def test_accepting_and_relabelling_on_the_page_store_the_same_decisions_as_the_cli(page):
    store, made, client = page
    token = form_token(client.get("/").get_data(as_text=True))
    response = client.post("/reviewer", data={"csrf_token": token, "reviewer": "bo", "next": "/"})
    assert response.status_code == 303
    response = client.post(f"/proposals/{made[0]['id']}/decide",
                           data={"csrf_token": token, "action": "accept", "note": "flipped",
                                 "next": "/?status=proposed"})
    assert response.status_code == 303 and response.headers["Location"] == "/?status=proposed"
    response = client.post(f"/proposals/{made[1]['id']}/decide",
                           data={"csrf_token": token, "action": "relabel", "new_label": "4", "note": "a four"})
    assert response.status_code == 303
    accepted, relabelled = store.proposals(ids=[made[0]["id"], made[1]["id"]])
    assert (accepted["status"], accepted["outcome"], accepted["reviewer"], accepted["note"]) == (
        "accepted", "remove", "bo", "flipped")
    assert (relabelled["outcome"], relabelled["new_label"], relabelled["reviewer"]) == ("relabel", 4, "bo")
    assert store.proposal_events(made[0]["id"])[-1] == {**store.proposal_events(made[0]["id"])[-1], "from": "proposed",
                                                        "to": "accepted", "actor": "bo", "note": "flipped"}

    # the CLI made the same kind of row: reject via CLI, then compare event shapes
    result = CliRunner().invoke(cli, ["--db", store.location, "review", "reject", str(made[2]["id"]), "--by", "bo",
                                      "--note", "fine"])
    assert result.exit_code == 0
    web_event, cli_event = store.proposal_events(made[0]["id"])[-1], store.proposal_events(made[2]["id"])[-1]
    assert set(web_event) == set(cli_event) and cli_event["actor"] == web_event["actor"] == "bo"

    # a bad decision is a page with one error line, and nothing changes
    response = client.post(f"/proposals/{made[3]['id']}/decide", data={"csrf_token": token, "action": "relabel"})
    assert response.status_code == 400 and "needs the new label" in response.get_data(as_text=True)
    assert store.proposals(ids=[made[3]["id"]])[0]["status"] == "proposed"

    detail = client.get(f"/proposals/{made[1]['id']}").get_data(as_text=True)
    assert "relabel to 4" in detail and "a four" in detail and "across runs and model versions" in detail


@pytest.mark.parametrize("headers, data, status", [
    ({}, {"action": "accept"}, 403),                                          # no token
    ({}, {"action": "accept", "csrf_token": "guess"}, 403),                   # wrong token
    ({"Origin": "http://evil.example"}, {"action": "accept", "csrf_token": None}, 403),  # cross-site
    ({"Host": "evil.example"}, {"action": "accept", "csrf_token": None}, 400),  # DNS rebinding
])
def test_forged_posts_change_nothing(page, headers, data, status):
    store, made, client = page
    token = form_token(client.get("/").get_data(as_text=True))
    data = {k: (token if v is None else v) for k, v in data.items()}
    response = client.post(f"/proposals/{made[0]['id']}/decide", data=data, headers=headers)
    assert response.status_code == status
    assert store.proposals(ids=[made[0]["id"]])[0]["status"] == "proposed"
    assert len(store.proposal_events(made[0]["id"])) == 1


def test_redirects_stay_on_this_server(page):
    store, made, client = page
    token = form_token(client.get("/").get_data(as_text=True))
    response = client.post(f"/proposals/{made[0]['id']}/decide",
                           data={"csrf_token": token, "action": "reject", "next": "//evil.example/"})
    assert response.status_code == 303 and response.headers["Location"] == "/"


def test_filters_by_status_rule_and_run(page):
    store, made, client = page
    token = form_token(client.get("/").get_data(as_text=True))
    client.post(f"/proposals/{made[0]['id']}/decide", data={"csrf_token": token, "action": "reject"})
    count = lambda html: len(re.findall(r'<div class="card" data-id=', html))  # noqa: E731
    assert count(client.get("/").get_data(as_text=True)) == 4
    assert count(client.get("/?status=rejected").get_data(as_text=True)) == 1
    assert count(client.get("/?status=all&rule=self-influence").get_data(as_text=True)) == 5
    assert count(client.get("/?status=all&rule=harmful").get_data(as_text=True)) == 0
    assert count(client.get(f"/?status=all&run={made[0]['run_id'] + 1}").get_data(as_text=True)) == 0
    assert client.get("/proposals/999").status_code == 404


def test_serve_refuses_a_port_in_use_with_one_line(digits_store):
    import socket

    store, _ = digits_store
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = CliRunner().invoke(cli, ["--db", store.location, "serve", "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 1 and "choose another port" in result.output and "Traceback" not in result.output
