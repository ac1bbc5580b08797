"""The suite's own scripted endpoint for blocking and LangChain tests: ``ThreadedEndpoint``.

The reference endpoint (``modal_llm.testing.LocalEndpoint``) covers Modal's behaviour; this
one answers by prompt prefix so a test can hold a request open, gate a batch until N
requests are in flight, or see its extra keyword arguments echoed back. It runs on
``modal_llm.testing.ServerThread``, like ``LocalEndpoint``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

from modal_llm.testing import ServerThread

WAIT = 10.0
"""Failsafe for waits on events that should come at once; never reached when tests pass."""
STREAM_PIECES = ("one ", "two ", "three")


class ThreadedEndpoint:
    """A loopback endpoint on its own thread. The prompt picks the behaviour.

    ``hold:...`` waits for ``release()`` (``received`` is set on arrival, ``disconnected``
    if the client goes away); ``gate:...`` waits until ``gate_at`` requests are in flight;
    ``fail:...`` answers 422; anything else is echoed as ``"<prompt> :: <kwargs>"``. With
    the stream flag the reply is SSE in ``STREAM_PIECES``; ``hold:`` then stops after one.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate_at = 1
        self.peers: set[object] = set()
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.received = threading.Event()
        self.disconnected = threading.Event()
        app = web.Application()
        app.router.add_post("/", self._handle)
        app.on_startup.append(self._events)
        self._server = ServerThread(app).start()
        self.url = self._server.url

    async def _events(self, app: web.Application) -> None:
        self._release = asyncio.Event()  # created on the server's loop
        self._gate = asyncio.Event()

    def release(self) -> None:
        self._server.call(self._release.set)

    def close(self) -> None:
        if self._server.running:
            self.release()
        self._server.close()

    @staticmethod
    def answer(body: dict[str, Any]) -> str:
        extra = {k: v for k, v in body.items() if k not in ("prompt", "stream")}
        return f"{body['prompt']} :: {json.dumps(extra, sort_keys=True)}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        prompt: str = body["prompt"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if prompt.startswith("fail:"):
                return web.json_response({"detail": "rejected"}, status=422)
            if prompt.startswith("gate:"):
                if self.in_flight >= self.gate_at:
                    self._gate.set()
                await asyncio.wait_for(self._gate.wait(), WAIT)
            if body.get("stream"):
                return await self._stream(request, hold=prompt.startswith("hold:"))
            if prompt.startswith("hold:"):
                await self._hold()
            return web.json_response({"prompt": self.answer(body), "usage": {"n": 1}})
        finally:
            self.in_flight -= 1

    async def _hold(self) -> None:
        self.received.set()
        try:
            await self._release.wait()
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    async def _stream(self, request: web.Request, *, hold: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in STREAM_PIECES:
            await resp.write(f"data: {json.dumps({'prompt': piece})}\n\n".encode())
            if hold:
                await self._hold()
        await resp.write(b"data: [DONE]\n\n")
        return resp
