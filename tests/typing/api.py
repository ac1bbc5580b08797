"""Public-API usage that mypy --strict checks and nobody runs (as stamina does)."""

from __future__ import annotations

from typing_extensions import assert_type

from modal_llm import (
    USE_CLIENT_DEFAULT,
    AsyncClient,
    BatchResult,
    Completion,
    ModalLLMError,
    PoolStats,
    RateLimiter,
    RetryPolicy,
    Timeout,
    UseClientDefault,
    is_retryable,
)


async def usage() -> None:
    async with AsyncClient(
        "https://me--llm.modal.run",
        modal_key="wk",
        modal_secret="ws",
        headers={"X": "y"},
        max_concurrency=8,
        timeout=Timeout(30.0, first_byte=600),
        retry=RetryPolicy(max_retries=1),
    ) as client:
        assert_type(await client.generate("hi", max_tokens=5), str)
        assert_type(await client.complete("hi"), Completion)
        assert_type(await client.generate_many(["a"]), list[str])
        assert_type(
            await client.generate_many(["a"], return_exceptions=True), list[str | ModalLLMError]
        )
        async for piece in client.stream("hi", stop=["\n"]):
            assert_type(piece, str)
        async for result in client.map(["a"], ordered=True, concurrency=8, max_tokens=5):
            assert_type(result, BatchResult)
            if result.error is not None:
                assert_type(is_retryable(result.error, RetryPolicy()), bool)
        assert_type(client.pool, PoolStats)
        assert_type(client.pool.slots_in_use, int)


def sync_usage() -> None:
    from modal_llm import Client

    with Client("https://me--llm.modal.run", max_concurrency=4) as client:
        assert_type(client.generate("hi"), str)
        assert_type(client.generate_many(["a"]), list[str])
        assert_type(client.generate_many(["a"], return_exceptions=True), list[str | ModalLLMError])
        for piece in client.stream("hi"):
            assert_type(piece, str)
        for result in client.map(["a"], rate_limit=RateLimiter(5), timeout=USE_CLIENT_DEFAULT):
            assert_type(result, BatchResult)
        assert_type(client.pool.connections_idle, int)


def forward(timeout: float | Timeout | UseClientDefault | None = USE_CLIENT_DEFAULT) -> None:
    from modal_llm import Client

    with Client("https://me--llm.modal.run") as client:
        assert_type(client.generate("hi", timeout=timeout), str)


def telemetry_usage() -> None:
    from opentelemetry import metrics, trace

    from modal_llm import Client

    AsyncClient(
        "https://me--llm.modal.run",
        tracer_provider=trace.get_tracer_provider(),
        meter_provider=metrics.get_meter_provider(),
        capture_content=False,
    )
    Client("https://me--llm.modal.run", tracer_provider=trace.NoOpTracerProvider())
