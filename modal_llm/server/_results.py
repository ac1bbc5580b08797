"""Modal's 303 emulation: a call longer than one hop runs in the background behind a result
URL (``?__modal_function_call_id=fc-...``) that GETs wait on, one hop at a time."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web

from ._config import RESULT_QUERY, ServerConfig
from ._contract import INVALID_CALL, json_reply, reply_body, text_reply, toy_generate
from ._faults import Faults, Spawn
from ._stats import ServerStats


class Results:
    """Non-streaming replies: generated inline, or in the background behind a result URL."""

    def __init__(self, stats: ServerStats, faults: Faults, spawn: Spawn) -> None:
        self.stats = stats
        self.faults = faults
        self._spawn = spawn
        self._calls: dict[str, asyncio.Task[bytes]] = {}

    async def _work(self, config: ServerConfig, prompt: str) -> bytes:
        self.stats.generations_started += 1
        self.stats.notify()
        if config.work_time > 0:
            await asyncio.sleep(config.work_time)
        self.stats.generations_finished += 1
        self.stats.notify()
        return reply_body(prompt, toy_generate(prompt, echo_prompt=config.echo_prompt))

    async def complete(
        self, request: web.Request, config: ServerConfig, prompt: str
    ) -> web.Response:
        """Answer a POST: the reply, or a 303 to its result URL after ``hop_time``."""
        if config.work_time <= config.hop_time:
            return json_reply(await self._work(config, prompt))
        # Modal: the call runs once, in the background; the POST blocks up to one hop, then
        # answers 303 to a result URL that any number of GETs can wait on.
        call_id = f"fc-{uuid.uuid4().hex}"
        self._calls[call_id] = self._spawn(self._work(config, prompt))
        return await self._await_result(request, config, call_id)

    async def poll(self, request: web.Request, config: ServerConfig, call_id: str) -> web.Response:
        """Answer a GET of a result URL: the result, another 303, or 404 once handed out."""
        if call_id not in self._calls:
            return text_reply(404, INVALID_CALL)
        fault = self.faults.poll_fault(config)
        if fault is not None:
            return fault
        return await self._await_result(request, config, call_id)

    async def _await_result(
        self, request: web.Request, config: ServerConfig, call_id: str
    ) -> web.Response:
        task = self._calls[call_id]
        # asyncio.wait never cancels the work, even when this request is cancelled.
        await asyncio.wait({task}, timeout=config.hop_time)
        if not task.done():
            location = request.url.update_query({RESULT_QUERY: call_id})
            return web.Response(status=303, headers={"Location": str(location)})
        # Modal hands out a result once; later GETs of the URL are 404.
        if self._calls.pop(call_id, None) is None:
            return text_reply(404, INVALID_CALL)
        return json_reply(task.result())

    def clear(self) -> None:
        """Forget every pending call (at shutdown, once their tasks are cancelled)."""
        self._calls.clear()
