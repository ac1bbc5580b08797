"""Fault switches at work: which POST or poll gets an error status, and the cold start.

POST faults are decided in this order, numbering the POSTs that passed auth: the
``error_burst``, then ``rate_limit_every``/``rate_limit_rate``, then ``failure_rate``. Each
POST draws the same two random numbers whichever switches are on, so a seed gives one fault
sequence.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from ._config import ServerConfig
from ._contract import INTERNAL_ERROR, status_reply, text_reply
from ._stats import ServerStats

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Faults:
    """The fault state of one endpoint: POST and poll numbering, random draws, warm or cold."""

    def __init__(self, config: ServerConfig, stats: ServerStats, spawn: Spawn) -> None:
        self.stats = stats
        self._spawn = spawn
        self._rng = random.Random(config.seed)
        self._post_number = 0
        self._poll_number = 0
        self._warm = config.cold_start <= 0
        self._boot: asyncio.Task[None] | None = None
        self.last_done = time.monotonic()
        """When the last request finished: the idle clock of ``idle_reset``."""

    def post_fault(self, config: ServerConfig) -> web.Response | None:
        """Number this POST; return its fault reply, or None to serve it."""
        self._post_number += 1
        number = self._post_number
        # Always draw both numbers so that a seed fixes the sequence whatever is switched on.
        rate_draw = self._rng.random()
        fail_draw = self._rng.random()
        if number <= config.error_burst:
            return self.error(config, config.error_status)
        if (
            config.rate_limit_every and number % config.rate_limit_every == 0
        ) or rate_draw < config.rate_limit_rate:
            return self.error(config, 429)
        if fail_draw < config.failure_rate:
            return text_reply(500, INTERNAL_ERROR)
        return None

    def poll_fault(self, config: ServerConfig) -> web.Response | None:
        """Number this GET of a result URL; return its fault reply, or None to serve it."""
        self._poll_number += 1
        every = config.poll_error_every
        if every and self._poll_number % every == 0:
            return self.error(config, config.error_status)
        return None

    def error(self, config: ServerConfig, status: int) -> web.Response:
        """Modal's reply for ``status``, with ``retry_after`` as Retry-After on a 429."""
        retry_after = config.retry_after
        headers = {"Retry-After": retry_after} if status == 429 and retry_after else None
        return status_reply(status, headers)

    def needs_warm_up(self, config: ServerConfig) -> bool:
        """Whether this POST may have to wait for a (new) cold start."""
        return not self._warm or config.idle_reset > 0

    async def warm_up(self, config: ServerConfig) -> None:
        """Wait out the cold start, if the container is cold; concurrent POSTs share it."""
        if config.cold_start <= 0:
            return
        if (
            self._warm
            and config.idle_reset > 0
            and self.stats.in_flight == 1
            and time.monotonic() - self.last_done >= config.idle_reset
        ):
            self._warm = False
        if self._warm:
            return
        if self._boot is None:
            self.stats.cold_starts += 1
            self._boot = self._spawn(asyncio.sleep(config.cold_start))
            self._boot.add_done_callback(self._booted)
        # Requests that arrive during a cold start share it; a client leaving doesn't stop it.
        await asyncio.shield(self._boot)

    def _booted(self, task: asyncio.Task[None]) -> None:
        self._boot = None
        if not task.cancelled():
            self._warm = True
