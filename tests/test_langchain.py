"""The LangChain ``Modal`` LLM against a loopback endpoint on its own thread.

Covers the Runnable surface (invoke, ainvoke, stream, astream, batch, abatch, chains),
per-prompt errors, concurrency, loop affinity, secrets, and parity with
``langchain_community.llms.Modal``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import gc
import hashlib
import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumpd, dumps, loads
from langchain_core.outputs import GenerationChunk
from langchain_core.prompts import PromptTemplate
from pydantic import SecretStr, ValidationError

from modal_llm import StatusError
from modal_llm.langchain import ChatModal, Modal
from modal_llm.langchain._clients import client_cap

from .endpoints import STREAM_PIECES, WAIT, ThreadedEndpoint

KEY, SECRET = "wk-SECRET-KEY-1", "ws-SECRET-VALUE-2"
AUTH: dict[str, Any] = {"modal_key": SecretStr(KEY), "modal_secret": SecretStr(SECRET)}


class Recorder(BaseCallbackHandler):
    """Records streamed tokens and what LangChain serialized at the start of each run."""

    run_inline = True

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.chunks: list[Any] = []
        self.serialized: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kw: Any) -> None:
        self.serialized.append(serialized)

    def on_llm_new_token(self, token: Any, *, chunk: Any = None, **kw: Any) -> None:
        self.tokens.append(token)
        self.chunks.append(chunk)

    def on_llm_error(self, error: BaseException, **kw: Any) -> None:
        self.errors.append(error)


@pytest.fixture
def endpoint() -> Iterator[ThreadedEndpoint]:
    server = ThreadedEndpoint()
    yield server
    server.close()


@pytest.fixture
def llm(endpoint: ThreadedEndpoint) -> Modal:
    return Modal(endpoint_url=endpoint.url, model_kwargs={"max_tokens": 8}, max_retries=0)


def echo(prompt: str, **extra: Any) -> str:
    return ThreadedEndpoint.answer({"prompt": prompt, **extra})


def test_invoke(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    assert llm.invoke("hi") == echo("hi", max_tokens=8)
    assert llm.invoke("hi", temperature=0.5) == echo("hi", max_tokens=8, temperature=0.5)
    assert endpoint.bodies[0] == {"prompt": "hi", "max_tokens": 8}
    # Call-time keyword arguments go to the endpoint; headers/timeout go to the client.
    assert llm.invoke("hi", headers={"X-Trace": "t-1"}, timeout=30) == echo("hi", max_tokens=8)
    assert endpoint.headers[-1]["X-Trace"] == "t-1"


async def test_ainvoke(llm: Modal) -> None:
    assert await llm.ainvoke("hi") == echo("hi", max_tokens=8)
    with pytest.raises(StatusError):
        await llm.ainvoke("fail: no")


def test_stream_fires_callbacks(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    recorder = Recorder()
    pieces = list(llm.stream("tell me", config={"callbacks": [recorder]}))
    assert pieces == list(STREAM_PIECES)
    assert recorder.tokens == list(STREAM_PIECES)
    assert all(isinstance(chunk, GenerationChunk) for chunk in recorder.chunks)
    assert endpoint.bodies[-1] == {"prompt": "tell me", "max_tokens": 8, "stream": True}


async def test_astream_fires_callbacks(llm: Modal) -> None:
    recorder = Recorder()
    pieces = [p async for p in llm.astream("tell me", config={"callbacks": [recorder]})]
    assert pieces == list(STREAM_PIECES)
    assert recorder.tokens == list(STREAM_PIECES)


async def test_leaving_astream_early_closes_the_response(
    llm: Modal, endpoint: ThreadedEndpoint
) -> None:
    stream = llm.astream("hold: a long story")
    async for piece in stream:
        assert piece == "one "
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await asyncio.to_thread(endpoint.disconnected.wait, WAIT)


async def test_streaming_mode_joins_pieces(endpoint: ThreadedEndpoint) -> None:
    llm = Modal(endpoint_url=endpoint.url, streaming=True)
    recorder = Recorder()
    config: Any = {"callbacks": [recorder]}
    assert await llm.ainvoke("x", config=config) == "".join(STREAM_PIECES)
    assert await asyncio.to_thread(llm.invoke, "x", config) == "".join(STREAM_PIECES)
    assert recorder.tokens == list(STREAM_PIECES) * 2


def test_stop_sequences(llm: Modal) -> None:
    assert llm.invoke("hi there", stop=[" there"]) == "hi"
    assert "".join(llm.stream("x", stop=["two"])) == "one "
    merged = Modal(endpoint_url=llm.endpoint_url, model_kwargs={"stop": ["::"]})
    assert merged.invoke("a b c") == "a b c "
    assert merged.invoke("a b c", stop=[" b"]) == "a"


async def test_async_stop_sequences(llm: Modal) -> None:
    assert await llm.ainvoke("hi there", stop=[" there"]) == "hi"
    assert "".join([p async for p in llm.astream("x", stop=["three"])]) == "one two "


def test_prompt_template_chain(llm: Modal) -> None:
    chain = PromptTemplate.from_template("Question: {q}\nAnswer:") | llm
    assert chain.invoke({"q": "why?"}) == echo("Question: why?\nAnswer:", max_tokens=8)
    result = asyncio.run(chain.ainvoke({"q": "how?"}))
    assert result == echo("Question: how?\nAnswer:", max_tokens=8)


async def test_abatch_honours_max_concurrency(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 3
    prompts: list[Any] = [f"gate: {i}" for i in range(9)]
    results = await llm.abatch(prompts, config={"max_concurrency": 3})
    assert results == [echo(p, max_tokens=8) for p in prompts]
    assert endpoint.max_in_flight == 3  # the gate opens only when 3 are in flight together


async def test_abatch_defaults_to_the_client_limit(endpoint: ThreadedEndpoint) -> None:
    llm = Modal(endpoint_url=endpoint.url, max_concurrency=5)
    endpoint.gate_at = 5
    prompts: list[Any] = [f"gate: {i}" for i in range(10)]
    assert await llm.abatch(prompts) == [echo(p) for p in prompts]
    assert endpoint.max_in_flight == 5


# RunnableConfig's max_concurrency above the field (32) is honoured, not capped by the
# client: the gate opens only once 40 requests are in flight together (capped at 32 it
# would never open, and the endpoint would answer 500 after WAIT seconds).
ABOVE_FIELD = 40


async def test_abatch_config_above_the_field_is_honoured(
    llm: Modal, endpoint: ThreadedEndpoint
) -> None:
    endpoint.gate_at = ABOVE_FIELD
    prompts: list[Any] = [f"gate: {i}" for i in range(2 * ABOVE_FIELD)]
    results = await llm.abatch(prompts, config={"max_concurrency": ABOVE_FIELD})
    assert results == [echo(p, max_tokens=8) for p in prompts]
    assert endpoint.max_in_flight == ABOVE_FIELD
    loop = asyncio.get_running_loop()
    assert llm._async_clients.caps(loop) == [64]  # 40 rounded up to a power of two
    assert await llm.ainvoke("plain") == echo("plain", max_tokens=8)
    assert llm._async_clients.caps(loop) == [32, 64]  # no config: the field's client


async def test_chain_abatch_config_above_the_field_is_honoured(
    llm: Modal, endpoint: ThreadedEndpoint
) -> None:
    endpoint.gate_at = ABOVE_FIELD
    chain = PromptTemplate.from_template("gate: {i}") | llm
    inputs = [{"i": i} for i in range(ABOVE_FIELD)]
    results = await chain.abatch(inputs, config={"max_concurrency": ABOVE_FIELD})
    assert results == [echo(f"gate: {i}", max_tokens=8) for i in range(ABOVE_FIELD)]
    assert endpoint.max_in_flight == ABOVE_FIELD


async def test_ainvoke_inside_a_parent_run_uses_its_max_concurrency(
    llm: Modal, endpoint: ThreadedEndpoint
) -> None:
    from langchain_core.runnables import RunnableLambda

    endpoint.gate_at = ABOVE_FIELD

    async def ask(i: int) -> str:
        return await llm.ainvoke(f"gate: {i}")  # inherits the parent's config

    results = await RunnableLambda(ask).abatch(
        list(range(ABOVE_FIELD)), config={"max_concurrency": ABOVE_FIELD}
    )
    assert results == [echo(f"gate: {i}", max_tokens=8) for i in range(ABOVE_FIELD)]
    assert endpoint.max_in_flight == ABOVE_FIELD


async def test_concurrent_astreams_under_a_config_above_the_field(
    llm: Modal, endpoint: ThreadedEndpoint
) -> None:
    endpoint.gate_at = ABOVE_FIELD
    config: Any = {"max_concurrency": ABOVE_FIELD}

    async def one(i: int) -> str:
        return "".join([piece async for piece in llm.astream(f"gate: {i}", config=config)])

    results = await asyncio.gather(*(one(i) for i in range(ABOVE_FIELD)))
    assert results == ["".join(STREAM_PIECES)] * ABOVE_FIELD
    assert endpoint.max_in_flight == ABOVE_FIELD


def test_concurrent_streams_under_a_config_above_the_field(
    llm: Modal, endpoint: ThreadedEndpoint
) -> None:
    endpoint.gate_at = ABOVE_FIELD
    config: Any = {"max_concurrency": ABOVE_FIELD}
    with concurrent.futures.ThreadPoolExecutor(ABOVE_FIELD) as pool:
        results = list(
            pool.map(lambda i: "".join(llm.stream(f"gate: {i}", config)), range(ABOVE_FIELD))
        )
    assert results == ["".join(STREAM_PIECES)] * ABOVE_FIELD
    assert endpoint.max_in_flight == ABOVE_FIELD
    assert sorted(llm._sync_clients) == [64]


def test_batch_config_above_the_field_is_honoured(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = ABOVE_FIELD
    prompts: list[Any] = [f"gate: {i}" for i in range(ABOVE_FIELD)]
    results = llm.batch(prompts, config={"max_concurrency": ABOVE_FIELD})
    assert results == [echo(p, max_tokens=8) for p in prompts]
    assert endpoint.max_in_flight == ABOVE_FIELD
    assert sorted(llm._sync_clients) == [64]


def test_client_cap_rule() -> None:
    assert client_cap(32, None) == 32
    assert client_cap(32, 8) == 32  # the batch runs 8 at once on the field's client
    assert client_cap(32, 32) == 32
    assert client_cap(32, 33) == 64
    assert client_cap(32, 128) == 128
    assert client_cap(4, 5) == 8


def test_batch_honours_max_concurrency(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 4
    prompts: list[Any] = [f"gate: {i}" for i in range(12)]
    assert llm.batch(prompts, config={"max_concurrency": 4}) == [
        echo(p, max_tokens=8) for p in prompts
    ]
    assert endpoint.max_in_flight == 4


async def test_agenerate_fans_out(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 4
    prompts = [f"gate: {i}" for i in range(4)]
    result = await llm.agenerate(prompts)
    assert [g[0].text for g in result.generations] == [echo(p, max_tokens=8) for p in prompts]
    assert endpoint.max_in_flight == 4  # LLM._agenerate would send them one by one


def test_generate_fans_out(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 4
    prompts = [f"gate: {i}" for i in range(4)]
    result = llm.generate(prompts)
    assert [g[0].text for g in result.generations] == [echo(p, max_tokens=8) for p in prompts]
    assert endpoint.max_in_flight == 4


async def test_abatch_errors_stay_per_prompt(llm: Modal) -> None:
    recorder = Recorder()
    config: Any = {"callbacks": [recorder]}
    results: list[Any] = await llm.abatch(
        ["a", "fail: b", "c"], config=config, return_exceptions=True
    )
    assert results[0] == echo("a", max_tokens=8)
    assert isinstance(results[1], StatusError)
    assert results[1].status_code == 422
    assert results[2] == echo("c", max_tokens=8)
    assert len(recorder.errors) == 1
    with pytest.raises(StatusError):
        await llm.abatch(["a", "fail: b", "c"])


def test_batch_errors_stay_per_prompt(llm: Modal) -> None:
    results: list[Any] = llm.batch(["a", "fail: b", "c"], return_exceptions=True)
    assert results[0] == echo("a", max_tokens=8)
    assert isinstance(results[1], StatusError)
    assert results[2] == echo("c", max_tokens=8)
    with pytest.raises(StatusError):
        llm.batch(["a", "fail: b", "c"])
    assert llm.batch([]) == []


def test_loop_affinity_sequence(llm: Modal) -> None:
    # Each asyncio.run() makes and closes its own loop; each gets its own pool, closed
    # before the loop goes ("Unclosed client session" would fail this test).
    assert asyncio.run(llm.ainvoke("first")) == echo("first", max_tokens=8)
    assert not llm._async_clients  # closed and forgotten with its loop
    assert asyncio.run(llm.ainvoke("second")) == echo("second", max_tokens=8)
    assert llm.invoke("sync") == echo("sync", max_tokens=8)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda i: llm.batch([f"t{i}a", f"t{i}b"]), range(4)))
    assert batches == [[echo(f"t{i}{x}", max_tokens=8) for x in "ab"] for i in range(4)]
    assert asyncio.run(llm.abatch(["again"])) == [echo("again", max_tokens=8)]


async def test_dropping_the_llm_in_a_live_loop_closes_that_loops_pool(
    endpoint: ThreadedEndpoint,
) -> None:
    llm = Modal(endpoint_url=endpoint.url)
    assert await llm.ainvoke("hi") == echo("hi")
    client = llm._async_clients._by_loop[asyncio.get_running_loop()][32][0]
    del llm  # as in a notebook: the loop lives on, so it must close the pool itself
    for _ in range(100):  # the loop's finalizer hook schedules the close; let it run
        if repr(client).endswith(" closed>"):
            break
        await asyncio.sleep(0)
    assert repr(client).endswith(" closed>")


def test_dropping_the_llm_closes_its_blocking_client(endpoint: ThreadedEndpoint) -> None:
    llm = Modal(endpoint_url=endpoint.url)
    assert llm.invoke("hi") == echo("hi")
    client = llm._sync_clients[32]
    assert client is not None
    portal = client._portal
    assert portal is not None
    del llm, client
    gc.collect()
    assert portal.closed
    assert portal.loop.is_closed()


def test_secrets_never_shown(endpoint: ThreadedEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm = Modal(endpoint_url=endpoint.url, **AUTH)
    recorder = Recorder()
    assert llm.invoke("hi", config={"callbacks": [recorder]}) == echo("hi")
    assert endpoint.headers[0]["Modal-Key"] == KEY
    assert endpoint.headers[0]["Modal-Secret"] == SECRET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        as_dict = llm.dict()
    shown = [
        repr(llm),
        str(llm),
        dumps(llm),
        json.dumps(dumpd(llm)),
        repr(as_dict),
        repr(llm._identifying_params),
        repr(recorder.serialized),
        caplog.text,
    ]
    for text in shown:
        assert KEY not in text
        assert SECRET not in text
    assert dumpd(llm)["kwargs"]["modal_key"] == {"lc": 1, "type": "secret", "id": ["MODAL_LLM_KEY"]}
    with pytest.raises(ValidationError) as info:
        Modal(endpoint_url="ftp://nope", **AUTH)
    assert KEY not in str(info.value)
    assert SECRET not in str(info.value)


class StartRecorder(BaseCallbackHandler):
    """Everything a tracer gets at the start of a run, as text."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_llm_start(self, serialized: Any, prompts: Any, **kw: Any) -> None:
        self.seen.append(repr((serialized, kw)))

    def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
        self.seen.append(repr((serialized, kw)))


@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
@pytest.mark.parametrize("cls", [Modal, ChatModal])
def test_the_endpoint_urls_query_values_are_never_shown(
    endpoint: ThreadedEndpoint, cls: type[Modal] | type[ChatModal]
) -> None:
    # docs/errors.md: the endpoint URL's query values are credentials (R2); userinfo is
    # refused at construction.
    token = "qs-LC-QUERY-TOKEN-5e1"
    url = endpoint.url + f"?token={token}"
    llm = cls(endpoint_url=url)
    recorder = StartRecorder()
    llm.invoke("hi", config={"callbacks": [recorder]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        as_dict = llm.dict()
    shown = [
        repr(llm),
        str(llm),
        dumps(llm),
        repr(as_dict),
        repr(llm._identifying_params),
        repr(llm.model_dump()),
        llm.model_dump_json(),
        *recorder.seen,
    ]
    assert len(recorder.seen) == 1
    for text in shown:
        assert token not in text, text
    assert "token=***" in repr(llm)
    other = cls(endpoint_url=url.replace(token, "qs-another-token"))
    assert other._identifying_params != llm._identifying_params  # the LLM cache keeps apart
    plain = hashlib.sha256(url.encode()).hexdigest()[:16]  # keyed: guessing it is no use
    assert llm._identifying_params["endpoint_digest"] != plain
    with pytest.raises(ValidationError, match="masked"):  # never sends the mask (R16)
        cls.model_validate(llm.model_dump())
    again = loads(  # the URL is serialized as a secret, as modal_key is
        dumps(llm),
        secrets_map={"MODAL_LLM_ENDPOINT_URL": url},
        valid_namespaces=["modal_llm"],
        allowed_objects=[cls],
    )
    assert again.endpoint_url == url


@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
def test_serialized_form_loads_with_secrets_from_a_map(endpoint: ThreadedEndpoint) -> None:
    llm = Modal(endpoint_url=endpoint.url, **AUTH)
    again = loads(
        dumps(llm),
        secrets_map={"MODAL_LLM_KEY": KEY, "MODAL_LLM_SECRET": SECRET},
        valid_namespaces=["modal_llm"],
        allowed_objects=[Modal],
    )
    assert isinstance(again, Modal)
    assert again.modal_key is not None
    assert again.modal_key.get_secret_value() == KEY


def test_unknown_kwarg_moves_into_model_kwargs(endpoint: ThreadedEndpoint) -> None:
    with pytest.warns(UserWarning, match="'temperature' is not a Modal field"):
        llm = Modal(endpoint_url=endpoint.url, temperature=0.2)  # type: ignore[call-arg]
    assert llm.model_kwargs == {"temperature": 0.2}
    assert llm.invoke("hi") == echo("hi", temperature=0.2)
    with pytest.raises(ValidationError, match="supplied twice"):
        Modal(endpoint_url=endpoint.url, top_p=1, model_kwargs={"top_p": 1})  # type: ignore[call-arg]


def test_bad_settings_fail_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="no endpoint URL"):
        Modal()
    with pytest.raises(ValidationError, match="must be an http"):
        Modal(endpoint_url="ftp://x")
    with pytest.raises(ValidationError, match="cannot hold headers"):
        Modal(endpoint_url="http://127.0.0.1:1/", model_kwargs={"headers": {}})
    with pytest.raises(ValidationError, match="given together"):
        Modal(endpoint_url="http://127.0.0.1:1/", modal_key=SecretStr("only-a-key"))
    with pytest.raises(ValidationError, match="max_concurrency"):
        Modal(endpoint_url="http://127.0.0.1:1/", max_concurrency=0)
    # The stream flag in model_kwargs made every unary call get an SSE reply (review R18).
    with pytest.raises(ValidationError, match="cannot hold 'stream': it is the stream flag"):
        Modal(endpoint_url="http://127.0.0.1:1/", model_kwargs={"stream": True})
    with pytest.raises(ValidationError, match="cannot hold 'go'"):
        Modal(endpoint_url="http://127.0.0.1:1/", stream_flag="go", model_kwargs={"go": False})
    kept = Modal(endpoint_url="http://127.0.0.1:1/", stream_flag=None, model_kwargs={"stream": 1})
    assert kept.model_kwargs == {"stream": 1}  # no flag: an ordinary model argument


def test_settings_fall_back_to_the_environment(
    endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", endpoint.url)
    monkeypatch.setenv("MODAL_LLM_KEY", KEY)
    monkeypatch.setenv("MODAL_LLM_SECRET", SECRET)
    llm = Modal()
    assert llm.endpoint_url == endpoint.url
    assert llm.invoke("hi") == echo("hi")
    assert endpoint.headers[0]["Modal-Key"] == KEY


def test_copies_get_their_own_clients(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    assert llm.invoke("hi") == echo("hi", max_tokens=8)
    other = llm.model_copy(update={"model_kwargs": {"top_k": 2}})
    assert other.invoke("hi") == echo("hi", top_k=2)
    assert other._sync_clients[32] is not llm._sync_clients[32]
    deep = copy.deepcopy(llm)
    deep.model_kwargs["max_tokens"] = 1
    assert llm.model_kwargs == {"max_tokens": 8}
    assert deep.invoke("hi") == echo("hi", max_tokens=1)


def test_identity(llm: Modal) -> None:
    assert llm._llm_type == "modal"
    assert llm._identifying_params == {
        "endpoint_url": llm.endpoint_url,
        "model_kwargs": {"max_tokens": 8},
    }


@pytest.mark.filterwarnings("ignore:`langchain-community` is being sunset:DeprecationWarning")
def test_same_outputs_as_langchain_community_modal(endpoint: ThreadedEndpoint) -> None:
    from langchain_community.llms import Modal as CommunityModal

    old = CommunityModal()
    # Under pydantic 2 its constructor moves every argument into model_kwargs; set them.
    old.endpoint_url = endpoint.url
    old.model_kwargs = {"max_tokens": 8}
    new = Modal(endpoint_url=endpoint.url, model_kwargs={"max_tokens": 8})
    cases: list[tuple[str, list[str] | None]] = [
        ("Question: what is 2+2?\nAnswer:", None),
        ("hello world", ["world"]),
        ("über ünïcode ✓", ["::"]),
    ]
    for prompt, stop in cases:
        assert new.invoke(prompt, stop=stop) == old.invoke(prompt, stop=stop)
    chain_old = PromptTemplate.from_template("Q: {q}") | old
    chain_new = PromptTemplate.from_template("Q: {q}") | new
    assert chain_new.invoke({"q": "why"}) == chain_old.invoke({"q": "why"})
    assert new._identifying_params == old._identifying_params
    assert new._llm_type == old._llm_type
    sent = endpoint.bodies  # ours, then the old class's, for each call
    assert len(sent) == 8
    assert sent[0::2] == sent[1::2]


def test_missing_langchain_core_gives_an_install_hint() -> None:
    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "try:\n    import modal_llm.langchain\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert "pip install 'langchain-core>=1,<2'" in done.stdout


# -- abatch when nothing observes the runs: straight to the client, same results ------------


async def test_quiet_abatch_matches_ainvoke(llm: Modal, endpoint: ThreadedEndpoint) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_core.prompt_values import StringPromptValue

    inputs: list[Any] = ["a", StringPromptValue(text="b"), [HumanMessage("c")]]
    assert await llm._quiet_call(None, {}) is not None  # this batch takes the quiet path
    quiet = await llm.abatch(inputs, stop=["::"], temperature=0.5)
    sent_quiet = list(endpoint.bodies)
    endpoint.bodies.clear()
    one_by_one = [await llm.ainvoke(x, stop=["::"], temperature=0.5) for x in inputs]
    assert quiet == one_by_one == ["a ", "b ", "Human: c "]
    assert sent_quiet == endpoint.bodies


async def test_quiet_abatch_keeps_errors_per_input(llm: Modal) -> None:
    results: list[Any] = await llm.abatch(["a", "fail: b", "c"], return_exceptions=True)
    assert results[0] == echo("a", max_tokens=8)
    assert isinstance(results[1], StatusError)
    assert results[2] == echo("c", max_tokens=8)
    with pytest.raises(StatusError):
        await llm.abatch(["a", "fail: b", "c"])
    # Bad model arguments fail per input too, as LangChain's own path does.
    bad: list[Any] = await llm.abatch(["a", "b"], return_exceptions=True, stop=[""])
    assert all(isinstance(item, ValueError) for item in bad)


async def test_observed_batches_go_through_langchain(endpoint: ThreadedEndpoint) -> None:
    from langchain_core.caches import InMemoryCache

    llm = Modal(endpoint_url=endpoint.url)
    recorder = Recorder()
    assert await llm._quiet_call({"callbacks": [recorder]}, {}) is None
    assert await llm._quiet_call([{}, {"callbacks": [recorder]}], {}) is None
    watched = Modal(endpoint_url=endpoint.url, callbacks=[recorder])
    assert await watched._quiet_call(None, {}) is None
    assert await Modal(endpoint_url=endpoint.url, streaming=True)._quiet_call(None, {}) is None
    cached = Modal(endpoint_url=endpoint.url, cache=InMemoryCache())
    assert await cached._quiet_call(None, {}) is None
    assert await cached.abatch(["x"]) == [echo("x")]
    assert await cached.abatch(["x", "x"]) == [echo("x")] * 2
    assert len(endpoint.bodies) == 1  # the others came from the cache
    await llm.abatch(["p", "q"], config={"callbacks": [recorder]})
    assert len(recorder.serialized) == 2  # one LangChain run per input
