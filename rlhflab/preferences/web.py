"""Labeling in a browser: `rlhflab prefs serve` — a local page over the preference store (Starlette + uvicorn).

The page shows the same thing as the terminal labeler (`label.py`): the first pair this labeler has not
labeled, A / B / tie / skip by click or by the terminal's keys, undo of the last label. A label is committed
(SQLite, `synchronous=FULL`) before its POST answers, and the page says "saved" and moves on only on that
answer, so whatever the page showed as saved survives the server being killed.

Safe by default, for a page that writes to a file on the user's machine:
- binds 127.0.0.1 only; every URL starts with a random token the command prints (no token, no page);
- the Host header must name the loopback (127.0.0.1, localhost, [::1]): a DNS-rebinding page, whose requests
  carry its own host name, gets 403; an Origin header, when sent, must be this very origin (cross-site 403);
- only the page's own files are served (Starlette's StaticFiles refuses paths outside its folder), with a
  content security policy that allows nothing from elsewhere and no framing.

Each request opens the store on its own thread: several labelers (one name each) label at once, each through
their own pending list, and SQLite's write lock orders their commits.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import uvicorn
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhflab.errors import UserError
from rlhflab.preferences.label import ACTIONS
from rlhflab.preferences.store import Pair, PreferenceStore

STATIC = Path(__file__).with_name("static")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# The page's keys are the terminal labeler's, less quit (closing the tab is quitting).
KEYS = {key: action for key, action in ACTIONS.items() if action != "quit"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the token is in the URL
    "cache-control": "no-store",
}


class Labeler(BaseModel):
    labeler: str = Field(min_length=1, max_length=100)


class Label(Labeler):
    pair_id: int
    choice: Literal["a", "b", "tie", "skip"]


def refusal(scope: Scope, token: str) -> str | None:
    """Why a request may not reach the app (None when it may): wrong token, foreign Host or cross-site Origin."""
    headers = Headers(scope=scope)
    host = headers.get("host", "")
    if host_name(host) not in LOOPBACK_NAMES:
        return f"forbidden: Host {host!r} is not this machine's loopback"
    origin = headers.get("origin")
    if origin is not None and origin.lower() != f"http://{host}".lower():
        return f"forbidden: cross-site request from Origin {origin!r}"
    first = scope["path"].removeprefix("/").partition("/")[0]
    if not secrets.compare_digest(first.encode(), token.encode()):
        return "forbidden: open the URL `rlhflab prefs serve` printed (it carries the access token)"
    return None


def host_name(host: str) -> str:
    """The name part of a Host header ("127.0.0.1:8765" -> "127.0.0.1", "[::1]:80" -> "[::1]"), lower-cased."""
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


class Guard:
    """ASGI middleware: 403 for every request `refusal` names, security headers on every response."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        reason = refusal(scope, self.token)
        app = self.app if reason is None else PlainTextResponse(reason, status_code=403)
        await app(scope, receive, send_with_headers)


def create_app(db: str | Path, token: str) -> Starlette:
    """The labeling app for the store at `db`; every path is under `/{token}/`."""

    def state(store: PreferenceStore, labeler: str) -> dict:
        pending = store.pending_pairs(labeler, limit=1)
        labeled, total = store.count_labeled(labeler), store.count_pairs()
        progress = {"labeler": labeler, "labeled": labeled, "left": total - labeled, "total": total,
                    "by_labeler": store.count_labeled_by_labeler()}
        return {"pair": pair_json(pending[0]) if pending else None, "progress": progress, "keys": KEYS}

    def with_store(work: Callable[[PreferenceStore], dict]) -> dict:
        with PreferenceStore(db, create=False) as store:
            return work(store)

    def record(body: Label) -> dict:
        def work(store: PreferenceStore) -> dict:
            saved = store.record_label(body.pair_id, body.labeler, body.choice)  # committed when it returns
            return {"saved": {"pair_id": saved.pair_id, "choice": saved.choice}, **state(store, body.labeler)}

        return with_store(work)

    def undo(body: Labeler) -> dict:
        def work(store: PreferenceStore) -> dict:
            undone = store.undo_last(body.labeler)
            gone = None if undone is None else {"pair_id": undone.pair_id, "choice": undone.choice}
            return {"undone": gone, **state(store, body.labeler)}

        return with_store(work)

    async def get_state(request: Request) -> JSONResponse:
        labeler = parse(Labeler, request.query_params).labeler
        return await answer(lambda: with_store(lambda store: state(store, labeler)))

    async def post_label(request: Request) -> JSONResponse:
        body = parse(Label, await json_body(request))
        return await answer(lambda: record(body))

    async def post_undo(request: Request) -> JSONResponse:
        body = parse(Labeler, await json_body(request))
        return await answer(lambda: undo(body))

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/", index),
        Route("/api/state", get_state),
        Route("/api/label", post_label, methods=["POST"]),
        Route("/api/undo", post_undo, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=[Mount(f"/{token}", routes=routes)], exception_handlers={UserError: user_error})
    app.add_middleware(Guard, token=token)
    return app


def pair_json(pair: Pair) -> dict:
    return {"id": pair.id, "prompt": pair.prompt.text, "a": pair.a.text, "b": pair.b.text}


def parse(model: type[BaseModel], data) -> BaseModel:
    if not isinstance(data, Mapping):
        raise UserError("bad request: the body must be a JSON object")
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"bad request: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


async def json_body(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise UserError("bad request: the body must be a JSON object") from None


async def answer(work: Callable[[], dict]) -> JSONResponse:
    # SQLite blocks (commit fsync, the write lock of another labeler): off the event loop.
    return JSONResponse(await run_in_threadpool(work))


async def user_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


def serve(db: str | Path, port: int, echo: Callable[[str], None] = print) -> None:
    """Serve the labeling page for `db` on 127.0.0.1:`port` (0: a free port) until interrupted."""
    PreferenceStore(db, create=False).close()  # a bad --db is a one-line error before anything listens
    try:
        sock = socket.create_server(("127.0.0.1", port))
    except OSError as e:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); pick another --port (0: any)") from None
    token = secrets.token_urlsafe(24)
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(db, token), log_level="warning", proxy_headers=False, server_header=False)
    echo(f"labeling page: http://127.0.0.1:{port}/{token}/  (Ctrl-C stops; every label shown as saved is on disk)")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C: for a server, the way to stop
        pass
    echo(f"stopped; the labels are in {db}")
