"""``ChatModal`` against a loopback endpoint on its own thread (the echo endpoint of test_sync).

The endpoint answers ``"<prompt> :: <extra keys as JSON>"``, so each test sees exactly
what was sent: the formatted prompt, the model arguments and the messages extra.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel

from modal_llm import StatusError
from modal_llm.langchain import ChatModal, Modal, UnsupportedFeatureError
from modal_llm.langchain._chat import messages_payload, transcript

from .endpoints import STREAM_PIECES, WAIT, ThreadedEndpoint


class Tokens(BaseCallbackHandler):
    run_inline = True

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.errors: list[BaseException] = []

    def on_llm_new_token(self, token: Any, **kw: Any) -> None:
        self.tokens.append(token)

    def on_llm_error(self, error: BaseException, **kw: Any) -> None:
        self.errors.append(error)


@pytest.fixture
def endpoint() -> Iterator[ThreadedEndpoint]:
    server = ThreadedEndpoint()
    yield server
    server.close()


def last_text(messages: Sequence[BaseMessage]) -> str:
    """A formatter that sends only the last message's text (the endpoint reads its prefix)."""
    return str(messages[-1].text)


@pytest.fixture
def chat(endpoint: ThreadedEndpoint) -> ChatModal:
    return ChatModal(endpoint_url=endpoint.url, max_retries=0, formatter=last_text)


def echo(prompt: str, **extra: Any) -> str:
    return ThreadedEndpoint.answer({"prompt": prompt, **extra})


def test_default_transcript(endpoint: ThreadedEndpoint) -> None:
    chat = ChatModal(endpoint_url=endpoint.url, max_tokens=16, temperature=0.5)
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("hi"),
        AIMessage("hello"),
        ToolMessage("42", tool_call_id="t1"),
        ChatMessage(role="critic", content="meh"),
        HumanMessage([{"type": "text", "text": "and "}, "you?"]),
    ]
    expected = (
        "System: Be brief.\nHuman: hi\nAI: hello\nTool: 42\ncritic: meh\nHuman: and you?\nAI:"
    )
    assert transcript(messages) == expected
    reply = chat.invoke(messages)
    assert isinstance(reply, AIMessage)
    assert reply.content == echo(expected, max_tokens=16, temperature=0.5)
    assert endpoint.bodies == [{"prompt": expected, "max_tokens": 16, "temperature": 0.5}]
    assert reply.response_metadata["usage"] == {"n": 1}  # the reply's other keys are kept
    assert reply.usage_metadata is None  # the contract defines no usage


def test_messages_extra(endpoint: ThreadedEndpoint) -> None:
    chat = ChatModal(endpoint_url=endpoint.url, send_messages=True, formatter=last_text)
    messages = [SystemMessage("sys"), HumanMessage("hi"), AIMessage("yo"), HumanMessage("q")]
    chat.invoke(messages)
    sent = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
    ]
    assert messages_payload(messages) == sent
    assert endpoint.bodies == [{"prompt": "q", "messages": sent}]


async def test_ainvoke_and_errors(chat: ChatModal) -> None:
    reply = await chat.ainvoke("hi")
    assert isinstance(reply, AIMessage)
    assert reply.content == echo("hi")
    with pytest.raises(StatusError):
        await chat.ainvoke("fail: no")


def test_stream_chunks_and_callbacks(chat: ChatModal, endpoint: ThreadedEndpoint) -> None:
    tokens = Tokens()
    chunks = list(chat.stream("tell me", config={"callbacks": [tokens]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content for c in chunks] == [*STREAM_PIECES, ""]
    assert chunks[-1].chunk_position == "last"
    assert tokens.tokens == [*STREAM_PIECES, ""]  # one callback per piece, as it arrives
    assert endpoint.bodies[-1] == {"prompt": "tell me", "stream": True}


async def test_astream_chunks_and_callbacks(chat: ChatModal) -> None:
    tokens = Tokens()
    chunks = [c async for c in chat.astream("tell me", config={"callbacks": [tokens]})]
    assert "".join(str(c.content) for c in chunks) == "".join(STREAM_PIECES)
    assert tokens.tokens == [*STREAM_PIECES, ""]


async def test_streaming_mode_joins_pieces(endpoint: ThreadedEndpoint) -> None:
    chat = ChatModal(endpoint_url=endpoint.url, streaming=True, formatter=last_text)
    tokens = Tokens()
    reply = await chat.ainvoke("x", config={"callbacks": [tokens]})
    assert reply.content == "".join(STREAM_PIECES)
    assert tokens.tokens[: len(STREAM_PIECES)] == list(STREAM_PIECES)


def test_stop_like_modal(endpoint: ThreadedEndpoint, chat: ChatModal) -> None:
    assert chat.invoke("hi there", stop=[" there"]).content == "hi"
    assert "".join(str(c.content) for c in chat.stream("x", stop=["two"])) == "one "
    fixed = ChatModal(endpoint_url=endpoint.url, formatter=last_text, stop=["::"])
    assert fixed.invoke("a b").content == "a b "
    assert fixed.invoke("a b", stop=[" b"]).content == "a"
    with pytest.raises(ValueError, match="stop sequences must be non-empty"):
        ChatModal(endpoint_url=endpoint.url, model_kwargs={"stop": [""]})
    assert all(body.get("stop") is None for body in endpoint.bodies)  # applied client-side


async def test_abatch_errors_stay_per_input_and_callbacks_per_run(chat: ChatModal) -> None:
    tokens = Tokens()
    config: Any = {"callbacks": [tokens]}
    results = await chat.abatch(["a", "fail: b", "c"], config=config, return_exceptions=True)
    assert [r.content for r in (results[0], results[2])] == [echo("a"), echo("c")]
    assert isinstance(results[1], StatusError)
    assert len(tokens.errors) == 1
    with pytest.raises(StatusError):
        await chat.abatch(["a", "fail: b"])


def test_batch_errors_stay_per_input(chat: ChatModal) -> None:
    results = chat.batch(["a", "fail: b", "c"], return_exceptions=True)
    assert isinstance(results[1], StatusError)
    assert results[2].content == echo("c")


async def test_abatch_honours_max_concurrency_above_the_field(
    chat: ChatModal, endpoint: ThreadedEndpoint
) -> None:
    endpoint.gate_at = 40  # opens only once 40 are in flight; the field allows 32
    prompts: list[Any] = [f"gate: {i}" for i in range(80)]
    results = await chat.abatch(prompts, config={"max_concurrency": 40})
    assert [r.content for r in results] == [echo(p) for p in prompts]
    assert endpoint.max_in_flight == 40


def test_batch_honours_max_concurrency(chat: ChatModal, endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 4
    prompts: list[Any] = [f"gate: {i}" for i in range(8)]
    results = chat.batch(prompts, config={"max_concurrency": 4})
    assert [r.content for r in results] == [echo(p) for p in prompts]
    assert endpoint.max_in_flight == 4


def test_prompt_template_chain(endpoint: ThreadedEndpoint) -> None:
    chat = ChatModal(endpoint_url=endpoint.url)
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in {lang}."), ("human", "{q}")])
    chain = prompt | chat | StrOutputParser()
    sent = "System: Answer in French.\nHuman: why?\nAI:"
    assert chain.invoke({"lang": "French", "q": "why?"}) == echo(sent)
    assert asyncio.run(chain.ainvoke({"lang": "French", "q": "why?"})) == echo(sent)


def test_message_loop(endpoint: ThreadedEndpoint) -> None:
    chat = ChatModal(endpoint_url=endpoint.url, stop=[" ::"])
    history: list[BaseMessage] = [SystemMessage("Be brief.")]
    for question in ["hi", "and then?"]:
        history.append(HumanMessage(question))
        history.append(chat.invoke(history))
    assert [m.type for m in history] == ["system", "human", "ai", "human", "ai"]
    assert endpoint.bodies[1]["prompt"] == (
        f"System: Be brief.\nHuman: hi\nAI: {history[2].text}\nHuman: and then?\nAI:"
    )


class Person(BaseModel):
    name: str


def test_refusals_say_why_and_send_nothing(chat: ChatModal, endpoint: ThreadedEndpoint) -> None:
    with pytest.raises(UnsupportedFeatureError, match="cannot call tools"):
        chat.bind_tools([Person])
    with pytest.raises(UnsupportedFeatureError, match="structured output"):
        chat.with_structured_output(Person)
    with pytest.raises(UnsupportedFeatureError, match="tool calling"):
        chat.invoke("hi", tools=[{"name": "x"}])
    with pytest.raises(UnsupportedFeatureError, match="token usage"):
        chat.invoke("hi", stream_usage=True)
    with pytest.raises(UnsupportedFeatureError, match="'image' content block"):
        ChatModal(endpoint_url=endpoint.url).invoke(
            [HumanMessage([{"type": "image", "url": "https://x/y.png"}])]
        )
    with pytest.raises(UnsupportedFeatureError, match="structured output"):
        ChatModal(endpoint_url=endpoint.url, model_kwargs={"response_format": {"type": "json"}})
    assert endpoint.bodies == []
    assert isinstance(UnsupportedFeatureError("x"), NotImplementedError)


def test_tracing_params(endpoint: ThreadedEndpoint) -> None:
    chat = ChatModal(endpoint_url=endpoint.url, max_tokens=10, temperature=0, stop=["x"])
    params = chat._get_ls_params(stop=["y"])
    assert params == {
        "ls_provider": "modal",
        "ls_model_name": "127.0.0.1",
        "ls_model_type": "chat",
        "ls_temperature": 0.0,
        "ls_max_tokens": 10,
        "ls_stop": ["x", "y"],
    }
    named = ChatModal(endpoint_url=endpoint.url, model_kwargs={"model": "llama-3"})
    assert named._get_ls_params()["ls_model_name"] == "llama-3"
    assert named._get_ls_params(model="other")["ls_model_name"] == "other"
    llm = Modal(endpoint_url=endpoint.url, model_kwargs={"model": "llama-3", "max_tokens": 5})
    assert llm._get_ls_params(stop=["z"]) == {
        "ls_provider": "modal",
        "ls_model_name": "llama-3",
        "ls_model_type": "llm",
        "ls_max_tokens": 5,
        "ls_stop": ["z"],
    }


def test_api_key_is_not_a_field(endpoint: ThreadedEndpoint) -> None:
    with pytest.warns(UserWarning, match="'api_key' is not a ChatModal field"):
        chat = ChatModal(endpoint_url=endpoint.url, api_key="k")  # type: ignore[call-arg]
    assert chat.model_kwargs == {"api_key": "k"}
    assert json.dumps(chat._identifying_params)


async def test_quiet_abatch_matches_ainvoke(endpoint: ThreadedEndpoint) -> None:
    for chat in (
        ChatModal(endpoint_url=endpoint.url, max_tokens=3),
        ChatModal(endpoint_url=endpoint.url, send_messages=True, stop=["::"]),
        ChatModal(endpoint_url=endpoint.url, formatter=last_text),
    ):
        inputs: list[Any] = ["a", [SystemMessage("s"), HumanMessage("b")]]
        assert await chat._quiet_call(None, {}) is not None
        endpoint.bodies.clear()
        quiet = await chat.abatch(inputs)
        sent_quiet = list(endpoint.bodies)
        endpoint.bodies.clear()
        one_by_one = [await chat.ainvoke(x) for x in inputs]
        assert sent_quiet == endpoint.bodies
        for got, want in zip(quiet, one_by_one, strict=True):
            assert type(got) is type(want) is AIMessage
            assert got.content == want.content
            assert got.response_metadata == want.response_metadata
            assert got.id is not None
            assert got.id.startswith("lc_run--")
            assert got.id.endswith("-0")
        assert quiet[0].id != quiet[1].id


async def test_quiet_abatch_refusals_stay_per_input(chat: ChatModal) -> None:
    results = await chat.abatch(["a", "b"], return_exceptions=True, tools=[{"name": "x"}])
    assert all(isinstance(item, UnsupportedFeatureError) for item in results)


async def test_quiet_abatch_builds_its_messages_once_the_requests_are_done(
    chat: ChatModal, endpoint: ThreadedEndpoint
) -> None:
    # Replies wait as (text, extra) tuples, which CPython's GC stops tracking; messages
    # built mid-batch made every young collection walk the requests in flight.
    def live_messages() -> int:
        return sum(type(o) is AIMessage for o in gc.get_objects())

    assert await chat._quiet_call(None, {}) is not None
    gc.collect()  # earlier tests' garbage cannot go away mid-test and hide a new message
    before = live_messages()
    inputs: list[Any] = ["a", "b", "fail: c", "hold: d"]
    batch = asyncio.ensure_future(
        chat.abatch(inputs, config={"max_concurrency": 1}, return_exceptions=True)
    )
    assert await asyncio.to_thread(endpoint.received.wait, WAIT)  # a, b, c answered
    assert live_messages() <= before  # none built while a request is in flight
    endpoint.release()
    results = await batch
    assert [r.content for r in (results[0], results[1], results[3])] == [
        echo("a"),
        echo("b"),
        echo("hold: d"),
    ]
    assert isinstance(results[2], StatusError)  # its own error, in its own slot
    assert len({r.id for r in (results[0], results[1], results[3])}) == 3
    results[0].response_metadata["mine"] = True  # each message has its own dict
    assert results[1].response_metadata == {"usage": {"n": 1}}
