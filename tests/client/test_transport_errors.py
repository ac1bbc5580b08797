"""Transport failures scripted at the session level with aioresponses (no socket needed).

aioresponses 0.7.9 cannot build a *response* under aiohttp 3.14 (``ClientResponse`` now
requires ``stream_writer``), so it scripts only the exceptions here; replies are tested
against real loopback servers in the other tests of tests/client/
"""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest
from aioresponses import aioresponses

from modal_llm import AsyncClient, ConnectError, EndpointTimeoutError

from ..conftest import NO_WAIT

URL = "https://me--llm-web.modal.run/"


@pytest.mark.parametrize(
    "failure",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientConnectionError("connection refused"),
    ],
)
async def test_failures_before_a_reply_are_retried(failure: Exception) -> None:
    with aioresponses() as mocked:
        mocked.post(URL, exception=failure, repeat=True)
        async with AsyncClient(URL, retry=dataclasses.replace(NO_WAIT, max_retries=2)) as client:
            with pytest.raises(ConnectError) as info:
                await client.generate("hi")
        assert sum(len(calls) for calls in mocked.requests.values()) == 3
    assert info.value.attempts == 3
    assert info.value.before_response
    assert "after 3 attempts" in str(info.value)


async def test_socket_timeout_maps_to_a_typed_timeout() -> None:
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.SocketTimeoutError(), repeat=True)
        async with AsyncClient(URL, max_retries=0) as client:
            with pytest.raises(EndpointTimeoutError) as info:
                await client.generate("hi")
    assert info.value.phase == "first_byte"
    assert info.value.attempts == 1


async def test_connection_timeout_maps_to_the_connect_phase() -> None:
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ConnectionTimeoutError(), repeat=True)
        async with AsyncClient(URL, retry=dataclasses.replace(NO_WAIT, max_retries=1)) as client:
            with pytest.raises(EndpointTimeoutError) as info:
                await client.generate("hi")
    assert info.value.phase == "connect"
    assert info.value.attempts == 2
