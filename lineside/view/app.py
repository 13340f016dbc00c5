"""The view's web app (Starlette): three pages, their JSON/SSE API and the control actions.

Pages: ``/`` live, ``/rejects`` (the record's rejects), ``/threshold`` (score histogram from the
record, what-if, Apply, pause/resume, model load). Everything they use is served from
``/static`` (no CDN; the Content-Security-Policy allows this origin only, so a page that tried
to load anything from elsewhere would be refused by the browser itself).

Every control action is checked here, on the server: without the operator role it is refused
with 403 whatever the page shows; each one is logged with the user it was done for, and sent
over the control endpoint with ``on_behalf_of`` set so the runtime's event names them too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from urllib.parse import parse_qs, quote
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .auth import User, Users
from .record import RecordReader
from .state import LiveState

log = logging.getLogger("linegate.view")
STATIC = Path(__file__).parent / "static"
COOKIE = "linegate_view"
SNAPSHOTS_PER_S = 4  # what a screen needs; the bus is followed at full rate regardless
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; form-action 'self'")
ControlCall = Callable[[str, dict, "str | None"], dict]


def clean(value: Any) -> Any:
    """JSON-able: NaN/inf -> None (an error decision's score), bytes dropped, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items() if not isinstance(v, (bytes, bytearray))}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def json_response(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(clean(value), status_code=status)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


class View:
    def __init__(self, state: LiveState, users: Users, control: ControlCall | None = None,
                 record: RecordReader | None = None) -> None:
        self.state, self.users, self.control, self.record = state, users, control, record
        self._snapshot: tuple[float, str] = (0.0, "")  # (monotonic time, JSON): shared by all streams

    def snapshot_json(self) -> str:
        """The live state as JSON, computed at most once per snapshot interval however many
        pages are open."""
        made, text = self._snapshot
        now = time.monotonic()
        if now - made >= 0.8 / SNAPSHOTS_PER_S:
            text = json.dumps(clean(self.state.snapshot()), allow_nan=False)
            self._snapshot = (now, text)
        return text

    # --- who is asking --------------------------------------------------------------------
    def user(self, request: Request) -> User | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return self.users.by_token(auth[7:].strip())
        sid = request.cookies.get(COOKIE)
        if sid:
            user = self.users.by_session(sid)
            if user is not None:
                return user
        return self.users.anonymous

    def _login_response(self, user: User, to: str) -> Response:
        response = RedirectResponse(to if to.startswith("/") and not to.startswith("//") else "/", 303)
        response.set_cookie(COOKIE, self.users.open_session(user), httponly=True, samesite="strict",
                            max_age=12 * 3600)
        log.info("login: %s (%s)", user.name, user.role)
        return response

    # --- pages ----------------------------------------------------------------------------
    def page(self, name: str) -> Callable:
        async def handler(request: Request) -> Response:
            token = request.query_params.get("token")
            if token:  # a kiosk URL: log in with the token, then drop it from the address bar
                user = self.users.by_token(token)
                if user is None:
                    return RedirectResponse("/login?failed=1", 303)
                return self._login_response(user, request.url.path)
            if self.user(request) is None:
                return RedirectResponse(f"/login?next={request.url.path}", 303)
            return FileResponse(STATIC / f"{name}.html")
        return handler

    async def login_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "login.html")

    async def login(self, request: Request) -> Response:
        # The login form is urlencoded: parsed here, so the view needs no multipart parser.
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        to = form.get("next") or "/"
        name, password, token = (form.get(k, "") for k in ("name", "password", "token"))
        # PBKDF2 takes a good fraction of a second on purpose: off the loop, or every live page stalls.
        user = await run_in_threadpool(
            lambda: self.users.by_token(token) if token else self.users.by_password(name, password))
        if user is None:
            log.warning("login refused for %r from %s", name or "(token)",
                        request.client.host if request.client else "?")
            await asyncio.sleep(1)  # slows guessing down; other requests go on meanwhile
            return RedirectResponse(f"/login?failed=1&next={quote(to)}", 303)
        return self._login_response(user, to)

    async def logout(self, request: Request) -> Response:
        sid = request.cookies.get(COOKIE)
        if sid:
            self.users.close_session(sid)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE)
        return response

    # --- live -----------------------------------------------------------------------------
    def _viewer(self, request: Request) -> User | JSONResponse:
        user = self.user(request)
        return user if user is not None else error(401, "log in first (/login)")

    async def me(self, request: Request) -> Response:
        user = self._viewer(request)
        if isinstance(user, Response):
            return user
        return json_response({"name": user.name, "role": user.role, "control": self.control is not None,
                              "record": self.record is not None})

    async def snapshot(self, request: Request) -> Response:
        user = self._viewer(request)
        return user if isinstance(user, Response) else json_response(self.state.snapshot())

    async def stream(self, request: Request) -> Response:
        """Server-sent events: one snapshot of the live state SNAPSHOTS_PER_S times a second."""
        user = self._viewer(request)
        if isinstance(user, Response):
            return user

        async def events():
            while True:
                yield f"data: {self.snapshot_json()}\n\n"
                await asyncio.sleep(1 / SNAPSHOTS_PER_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def overlay(self, request: Request) -> Response:
        user = self._viewer(request)
        if isinstance(user, Response):
            return user
        found = self.state.overlay(request.path_params["camera"])
        if found is None:
            return error(404, f"no overlay from camera {request.path_params['camera']!r} yet")
        version, jpeg, _ = found
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "no-store", "X-Overlay-Version": str(version)})

    # --- record ---------------------------------------------------------------------------
    def _record(self, request: Request) -> RecordReader | Response:
        user = self._viewer(request)
        if isinstance(user, Response):
            return user
        if self.record is None:
            return error(404, "no record: start the view with --db PATH (the `linegate record` database)")
        return self.record

    async def rejects(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        q = request.query_params
        try:
            query = {"decision": q.get("decision") or "reject", "camera": q.get("camera") or None,
                     "since": float(q["since"]) if q.get("since") else None,
                     "until": float(q["until"]) if q.get("until") else None,
                     "limit": min(int(q.get("limit") or 60), 1000)}
        except ValueError:
            return error(400, "since/until are epoch seconds and limit a whole number")
        rows = await record.decisions(**query)
        return json_response({"rows": rows, "query": query})

    async def decision(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        row = await record.decision(int(request.path_params["row_id"]))
        return json_response(row) if row is not None else error(404, "no such decision in the record")

    async def image(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        kind = request.path_params["kind"]
        if kind not in ("frame", "overlay"):
            return error(404, "image kind is frame or overlay")
        try:
            data = await record.image(int(request.path_params["row_id"]), kind,
                                      request.query_params.get("thumb") == "1")
        except (OSError, ValueError) as exc:
            return error(404, str(exc))
        if data is None:
            return error(404, f"the record keeps no {kind} for this decision")
        kind_type = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        return Response(data, media_type=kind_type, headers={"Cache-Control": "private, max-age=3600"})

    async def scores(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        n = max(1, min(int(request.query_params.get("n") or 1000), 100000))
        camera = request.query_params.get("camera") or None
        if camera is None:
            rows = [list(r) for r in await record.scores(n)]
        else:  # one camera's (a per-camera threshold's what-if): its own last n decisions
            rows = [[d.get("score"), d.get("threshold"), d.get("decision")]
                    for d in await record.decisions(camera=camera, limit=n)]
        return json_response({"n": n, "camera": camera, "scores": rows})

    async def record_events(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        return json_response({"events": await record.events(50)})

    # --- control --------------------------------------------------------------------------
    async def control_status(self, request: Request) -> Response:
        user = self._viewer(request)
        if isinstance(user, Response):
            return user
        if self.control is None:
            return error(404, "no control endpoint: start the view with --control ENDPOINT")
        try:
            return json_response({"ok": True, "result": await run_in_threadpool(self.control, "status", {}, None)})
        except Exception as exc:  # noqa: BLE001 - the reason goes to the page
            return error(502, f"control endpoint: {exc}")

    async def control_action(self, request: Request) -> Response:
        """POST /api/control/{cmd}: operator only, JSON body (a cross-site form cannot send one)."""
        cmd = request.path_params["cmd"]
        user = self.user(request)
        if user is None or not user.operator:
            who = user.name if user else "nobody"
            log.warning("control %s refused for %s (%s): needs the operator role", cmd, who,
                        user.role if user else "not logged in")
            return error(403, f"{cmd}: needs the operator role (you are {who}"
                              f"{', a ' + user.role if user else ''})")
        if cmd not in ("threshold", "pause", "resume", "load"):
            return error(404, f"unknown control action {cmd!r}")
        if self.control is None:
            return error(404, "no control endpoint: start the view with --control ENDPOINT")
        if "application/json" not in request.headers.get("content-type", ""):
            return error(415, "send the arguments as application/json")
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not valid JSON")
        args: dict[str, Any] = {}
        if cmd == "threshold":
            value = body.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return error(400, f"threshold: value must be a finite number, not {value!r}")
            args = {"value": float(value), "camera": body.get("camera") or None}
        elif cmd == "load":
            if not isinstance(body.get("bundle"), str) or not body["bundle"]:
                return error(400, "load: give the bundle directory on the runtime's machine")
            args = {"bundle": body["bundle"]}
        log.info("control %s %s by %s", cmd, args or "", user.name)
        try:
            result = await run_in_threadpool(self.control, cmd, args, user.name)
        except Exception as exc:  # noqa: BLE001 - refused or unreachable: the reason goes back
            log.warning("control %s by %s failed: %s", cmd, user.name, exc)
            return error(502, f"{cmd}: {exc}")
        self.state.set_control(result, None)
        return json_response({"ok": True, "result": result})


class SecurityHeaders:
    """Pure ASGI middleware (it leaves the SSE stream alone): this origin only, no sniffing."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(view: View) -> Starlette:
    routes = [
        Route("/", view.page("live")),
        Route("/rejects", view.page("rejects")),
        Route("/threshold", view.page("threshold")),
        Route("/login", view.login_page, methods=["GET"]),
        Route("/login", view.login, methods=["POST"]),
        Route("/logout", view.logout),
        Route("/favicon.ico", lambda r: FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")),
        Route("/api/me", view.me),
        Route("/api/live/snapshot", view.snapshot),
        Route("/api/live/stream", view.stream),
        Route("/api/live/overlay/{camera:path}", view.overlay),
        Route("/api/record/rejects", view.rejects),
        Route("/api/record/decision/{row_id:int}", view.decision),
        Route("/api/record/image/{row_id:int}/{kind}", view.image),
        Route("/api/record/scores", view.scores),
        Route("/api/record/events", view.record_events),
        Route("/api/control/status", view.control_status),
        Route("/api/control/{cmd}", view.control_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
