"""The review page: ``influence-store serve``, a small server-rendered Flask app over the store.

It reads through the store's verbs and writes only through ``curation.apply_decisions`` (the verb
behind ``review``), so a decision made on the page is the same row and audit event as one made in
the CLI. Every POST carries the session's token and, when the browser sends one, an Origin of this
server; Host must be this server's when it listens on loopback (no DNS rebinding). Nothing is
fetched from elsewhere: styles and the keyboard script are inline, images are ``data:`` URIs.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

from ..errors import InfluenceStoreError

PAGE_SIZE = 50
STATUSES = ("proposed", "accepted", "rejected", "applied")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(store, reviewer: str | None = None, use_task: bool = False, host: str = "127.0.0.1"):
    """The Flask app over ``store``; ``reviewer`` is the name decisions carry until the page sets one."""
    from flask import Flask, abort, redirect, render_template, request, session, url_for

    from ..curation import apply_decisions, current_user
    from ..render import StoredRenderer

    app = Flask(__name__)
    app.config.update(SECRET_KEY=secrets.token_hex(32), SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_HTTPONLY=True)
    if host in LOOPBACK:
        app.config["TRUSTED_HOSTS"] = list(LOOPBACK) + ["localhost.localdomain"]
    renderer = StoredRenderer(use_task=use_task)
    runs_cache: dict[int, dict] = {}
    default_reviewer = reviewer or current_user()

    def run_of(run_id: int) -> dict:
        if run_id not in runs_cache:
            runs_cache[run_id] = store.run(run_id)
        return runs_cache[run_id]

    def token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    @app.context_processor
    def page_globals() -> dict[str, Any]:
        return {"csrf_token": token(), "reviewer": session.get("reviewer", default_reviewer),
                "problems": renderer.problems}

    @app.before_request
    def protect_posts():
        request.host  # noqa: B018  (checks Host against TRUSTED_HOSTS: a foreign one is a 400 before anything runs)
        if request.method != "POST":
            return None
        origin = request.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.host:
            abort(403, "cross-site request refused (Origin is not this server)")
        if origin == "null" or request.form.get("csrf_token") != session.get("csrf") or not session.get("csrf"):
            abort(403, "missing or wrong form token; reload the page and try again")
        return None

    def views(proposals: list[dict], tests: int = 3) -> list[dict]:
        """Each proposal with its rendered example, its run, its numbers and the test examples it hurts most."""
        examples = store.examples(p["example_id"] for p in proposals)
        out = []
        for run_id in dict.fromkeys(p["run_id"] for p in proposals):
            run, mine = run_of(run_id), [p for p in proposals if p["run_id"] == run_id]
            info = store.run_examples(run_id, "train")
            hurts = store.most_hurt_tests(run_id, [p["example_id"] for p in mine], tests)
            test_examples = store.examples(t["example_id"] for rows in hurts.values() for t in rows)
            for p in mine:
                out.append({**p, "rendering": renderer.render(examples[p["example_id"]], run), "run": run,
                            "train_loss": info.get(p["example_id"], {}).get("loss"),
                            "self_influence": info.get(p["example_id"], {}).get("self_influence"),
                            "hurts": [{**t, "rendering": renderer.render(test_examples[t["example_id"]], run)}
                                      for t in hurts[p["example_id"]]]})
        order = {p["id"]: i for i, p in enumerate(proposals)}
        return sorted(out, key=lambda v: order[v["id"]])

    @app.get("/")
    def queue():
        args = request.args
        status = args.get("status", "proposed")
        run_id = args.get("run", type=int)
        rule = args.get("rule") or None
        page = max(1, args.get("page", 1, type=int))
        found = store.proposals(status=status if status in STATUSES else None, rule=rule, run_id=run_id)
        shown = found[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        every = store.proposals()
        return render_template(
            "queue.html", proposals=views(shown), total=len(found), page=page,
            pages=max(1, -(-len(found) // PAGE_SIZE)), status=status, run_id=run_id, rule=rule,
            statuses=STATUSES, runs=sorted({p["run_id"] for p in every}), rules=sorted({p["rule"] for p in every}))

    @app.get("/proposals/<int:proposal_id>")
    def proposal_page(proposal_id: int):
        found = store.proposals(ids=[proposal_id])
        if not found:
            abort(404, f"no proposal {proposal_id}")
        proposal = found[0]
        shown = views([proposal], tests=8)[0]
        same_key = store.examples_by_key(shown["key"], proposal["dataset"])
        history = store.example_history([e["id"] for e in same_key])
        others = [p for p in store.proposals(dataset=proposal["dataset"]) if p["key"] == proposal["key"]]
        return render_template("proposal.html", p=shown, events=store.proposal_events(proposal_id),
                               history=history, others=others)

    @app.post("/proposals/<int:proposal_id>/decide")
    def decide(proposal_id: int):
        form = request.form
        action = form.get("action", "")
        note = form.get("note", "").strip() or None
        new_label = form.get("new_label", "").strip() or None
        who = session.get("reviewer", default_reviewer)
        try:
            apply_decisions(store, [(proposal_id, action, new_label if action == "relabel" else None, note)], who)
        except InfluenceStoreError as exc:
            return render_template("error.html", message=str(exc)), 400
        return redirect(_local(form.get("next")) or url_for("queue"), code=303)

    @app.post("/reviewer")
    def set_reviewer():
        name = request.form.get("reviewer", "").strip()
        if not name or len(name) > 200:
            return render_template("error.html", message="give a reviewer name (1 to 200 characters)"), 400
        session["reviewer"] = name
        return redirect(_local(request.form.get("next")) or url_for("queue"), code=303)

    @app.errorhandler(403)
    @app.errorhandler(404)
    def refused(error):
        return render_template("error.html", message=error.description), error.code

    return app


def _local(target: str | None) -> str | None:
    """Only a path on this server is a place to go back to (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    return target if target.startswith("/") and not target.startswith("//") and not parts.netloc else None


def serve(store, host: str = "127.0.0.1", port: int = 8765, reviewer: str | None = None, use_task: bool = False,
          ready=None) -> None:
    """Serve the review page until interrupted; ``ready(server)`` is called once it listens."""
    import socket

    from werkzeug.serving import make_server

    try:  # werkzeug itself would print and exit: probe first, so the error is ours and one line
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        raise InfluenceStoreError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port") \
            from None
    server = make_server(host, port, create_app(store, reviewer, use_task, host), threaded=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
