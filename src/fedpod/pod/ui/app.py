"""The custodian's web page: datasets, policies, approvals, the audit log and live activity.

It runs on the custodian's own machine (127.0.0.1 unless told otherwise) and changes the pod
only through `pod.custodian.PodFolder`, exactly as the CLI does. Guards, each meant to hold on
its own:

- a random access token, printed at start, is exchanged on the login form for a session
  cookie (HttpOnly, SameSite=Strict); no page or API call works without the cookie;
- every form carries the session's CSRF token, and a POST whose Origin (or Referer) is not this
  page is refused — so another site cannot make the custodian's browser approve anything;
- a Content-Security-Policy of 'self' only and no external resource at all: the pod may be
  offline, and no CDN sees the custodian's pages.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from fedpod.errors import FedpodError
from fedpod.governance.audit_view import parse_since, rows
from fedpod.governance.policy import TASK_KINDS
from fedpod.pod.custodian import PodFolder, parse_kinds, policy_yaml
from fedpod.pod.status import running_pid

HERE = Path(__file__).parent
COOKIE = "fedpod_session"
ACTIVITY_BYTES = 2 * 1024 * 1024  # the live view reads at most the audit log's last 2 MiB
RECENT_TASKS = 50
PUBLIC_PATHS = ("/login", "/static/style.css")
FORMATTER = HtmlFormatter(cssclass="source", linenos="table")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class Sessions:
    """Session id -> its CSRF token, in memory: a restart of the page logs everyone out."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._csrf: dict[str, str] = {}

    def login(self, offered: str) -> str | None:
        if not hmac.compare_digest(offered.encode(), self.token.encode()):
            return None
        session = secrets.token_urlsafe(32)
        self._csrf[session] = secrets.token_urlsafe(32)
        return session

    def csrf(self, session: str | None) -> str | None:
        return self._csrf.get(session or "")


def recent_entries(path: Path) -> list[dict[str, Any]]:
    """The audit log's newest entries (at most its last ACTIVITY_BYTES), for the live view."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - ACTIVITY_BYTES))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    if size > ACTIVITY_BYTES:
        lines = lines[1:]  # the first line read may be cut
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def activity(folder: PodFolder) -> dict[str, Any]:
    """Tasks running now and the last RECENT_TASKS, from the audit log the pod writes."""
    tasks: dict[str, dict[str, Any]] = {}
    for entry in recent_entries(folder.storage / "audit.jsonl"):
        task = entry.get("task")
        if not isinstance(task, str):
            continue
        if entry["event"] == "task-received":
            tasks[task] = {"task": task[:12], "requester": entry.get("requester"), "dataset": entry.get("dataset"),
                           "kind": entry.get("kind"), "decision": entry.get("decision"),
                           "state": "running" if entry.get("decision") == "allow" else "refused",
                           "received": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["ts"])),
                           "details": entry.get("rule") or ""}
        elif task in tasks and entry["event"] in ("task-completed", "task-failed"):
            done = entry["event"] == "task-completed"
            tasks[task]["state"] = "completed" if done else "failed"
            tasks[task]["details"] = (f"{entry.get('returned_rows', entry.get('num_samples', ''))} "
                                      f"{'rows' if 'returned_rows' in entry else 'samples'} in {entry.get('seconds')} s"
                                      if done else f"{entry.get('error')}: {str(entry.get('message'))[:120]}")
    ordered = list(tasks.values())
    return {"running": [t for t in ordered if t["state"] == "running"], "recent": ordered[-RECENT_TASKS:][::-1],
            "pod_running": running_pid(folder.storage) is not None}


def create_app(folder: PodFolder, token: str) -> FastAPI:
    """The page for the pod configured at `folder`; `token` is what the login form accepts."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    sessions = Sessions(token)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        session = request.cookies.get(COOKIE)
        if path not in PUBLIC_PATHS and sessions.csrf(session) is None:
            if path.startswith("/api/") or request.method != "GET":
                response: Response = JSONResponse({"error": "log in first"}, status_code=401)
            else:
                response = RedirectResponse("/login", status_code=303)
        elif request.method == "POST" and not _same_origin(request):
            response = JSONResponse({"error": "cross-site request refused"}, status_code=403)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        csrf = sessions.csrf(request.cookies.get(COOKIE))
        config = folder.config
        return templates.TemplateResponse(request, f"{name}.html", {"csrf": csrf, "pod": config.name, "page": name,
                                                                     **context})

    async def checked_form(request: Request) -> dict[str, str]:
        form = await request.form()
        expected = sessions.csrf(request.cookies.get(COOKIE))
        offered = str(form.get("csrf", ""))
        if expected is None or not hmac.compare_digest(offered.encode(), expected.encode()):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
        return {k: str(v) for k, v in form.items()}

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"error": None, "page": "login", "csrf": None,
                                                                  "pod": folder.config.name})

    @app.post("/login")
    async def login(request: Request, token: str = Form("")) -> Response:
        session = sessions.login(token)
        if session is None:
            return templates.TemplateResponse(request, "login.html", {
                "error": "wrong token", "page": "login", "csrf": None, "pod": folder.config.name}, status_code=401)
        response = RedirectResponse("/approvals", status_code=303)
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/")
    async def home() -> RedirectResponse:
        return RedirectResponse("/approvals", status_code=303)

    @app.get("/datasets", response_class=HTMLResponse)
    async def datasets(request: Request) -> HTMLResponse:
        config = folder.config
        today = dt.datetime.now(dt.UTC).date()
        listed = []
        for spec in config.datasets:
            policy = config.policies.for_dataset(spec.name)
            who = [{"to": ", ".join(g.to), "kinds": ", ".join(g.kinds), "expires": g.expires or "never",
                    "active": g.active(today)} for g in policy.grants]
            listed.append({"spec": spec, "grants": who, "policy": policy})
        return page(request, "datasets", datasets=listed)

    @app.get("/policies", response_class=HTMLResponse)
    async def policies(request: Request) -> HTMLResponse:
        return page(request, "policies", text=policy_yaml(folder.config.policies), error=None, saved=False)

    @app.post("/policies", response_class=HTMLResponse)
    async def save_policies(request: Request) -> HTMLResponse:
        form = await checked_form(request)
        try:
            folder.replace_policy(form.get("policy", ""), "web page")
        except FedpodError as exc:
            return page(request, "policies", text=form.get("policy", ""), error=str(exc), saved=False)
        return page(request, "policies", text=policy_yaml(folder.config.policies), error=None, saved=True)

    @app.get("/approvals", response_class=HTMLResponse)
    async def approvals(request: Request, done: str | None = None) -> HTMLResponse:
        pending = [e for e in folder.requests.entries() if e["status"] == "pending"]
        policies = folder.config.policies
        plans = []
        for meta in folder.plans.entries():
            if meta["status"] == "pending":
                plans.append({**meta, "html": highlight(folder.plans.source(meta["sha256"]), PythonLexer(), FORMATTER),
                              "from": policies.name_of(meta["requester"]) or meta["requester"]})
        return page(request, "approvals", requests=pending, plans=plans, kinds=TASK_KINDS, done=done)

    @app.post("/approvals/{request_id}/approve")
    async def approve(request: Request, request_id: int) -> Response:
        form = await checked_form(request)
        kinds = [k for k in TASK_KINDS if form.get(f"kind_{k}")]
        try:
            expires = dt.date.fromisoformat(form["expires"]) if form.get("expires") else None
        except ValueError:
            raise HTTPException(400, f"expires {form['expires'][:40]!r} is not a date (YYYY-MM-DD)") from None
        try:
            folder.approve(request_id, parse_kinds(",".join(kinds)) if kinds else None, expires,
                           form.get("name") or None, source="web page")
        except FedpodError as exc:
            raise HTTPException(400, str(exc)) from exc
        return RedirectResponse(f"/approvals?done=approved+request+{request_id}", status_code=303)

    @app.post("/approvals/{request_id}/deny")
    async def deny(request: Request, request_id: int) -> Response:
        await checked_form(request)
        try:
            folder.deny(request_id, source="web page")
        except FedpodError as exc:
            raise HTTPException(400, str(exc)) from exc
        return RedirectResponse(f"/approvals?done=denied+request+{request_id}", status_code=303)

    @app.post("/plans/{sha}/{verdict}")
    async def decide_plan(request: Request, sha: str, verdict: str) -> Response:
        await checked_form(request)
        if verdict not in ("approve", "reject"):
            raise HTTPException(404, "approve or reject")
        try:
            meta = folder.decide_plan(sha, approved=verdict == "approve")
        except FedpodError as exc:
            raise HTTPException(400, str(exc)) from exc
        return RedirectResponse(f"/approvals?done={verdict}d+plan+{meta['sha256'][:12]}", status_code=303)

    @app.get("/audit", response_class=HTMLResponse)
    async def audit(request: Request, since: str = "", dataset: str = "", modeller: str = "",
                    decision: str = "") -> HTMLResponse:
        try:
            selected = rows(folder.audit.entries(), since=parse_since(since) if since else None,
                            dataset=dataset or None, modeller=modeller or None, decision=decision or None)
            error = None
        except FedpodError as exc:
            selected, error = [], str(exc)
        return page(request, "audit", entries=selected[-500:][::-1], total=len(selected), error=error,
                    filters={"since": since, "dataset": dataset, "modeller": modeller, "decision": decision},
                    verified=None)

    @app.post("/audit/verify", response_class=HTMLResponse)
    async def verify(request: Request) -> HTMLResponse:
        await checked_form(request)
        result = folder.verify_audit()
        selected = rows(folder.audit.entries())
        return page(request, "audit", entries=selected[-500:][::-1], total=len(selected), error=None,
                    filters={"since": "", "dataset": "", "modeller": "", "decision": ""}, verified=result)

    @app.get("/activity", response_class=HTMLResponse)
    async def activity_page(request: Request) -> HTMLResponse:
        return page(request, "activity")

    @app.get("/api/activity")
    async def activity_api() -> dict[str, Any]:
        return activity(folder)

    @app.get("/source.css")
    async def source_css() -> Response:
        return Response(FORMATTER.get_style_defs(".source"), media_type="text/css")

    return app


def _same_origin(request: Request) -> bool:
    """A POST must come from this page: its Origin (or, without one, its Referer) names this host."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if claimed is None:
        return True  # not sent by a browser (the CSRF token still has to match)
    parts = urlsplit(claimed)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"
