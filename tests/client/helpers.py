"""Helpers shared by the client tests: canned replies and a request recorder."""

from __future__ import annotations

from typing import Any

from aiohttp import web

KEY, SECRET = "wk-test-key-123", "ws-test-secret-456"


def reply(text: str, **extra: Any) -> web.Response:
    return web.json_response({"prompt": text, **extra})


class Recorder:
    """Counts what the server saw, per method, with the last request's headers and bodies."""

    def __init__(self) -> None:
        self.posts = 0
        self.gets = 0
        self.headers: list[dict[str, str]] = []
        self.bodies: list[Any] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def record(self, request: web.Request) -> None:
        if request.method == "POST":
            self.posts += 1
            self.bodies.append(await request.json())
        else:
            self.gets += 1
        self.headers.append(dict(request.headers))
