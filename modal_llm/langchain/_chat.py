"""LangChain ``ChatModal`` chat model: messages in, an ``AIMessage`` out, over modal-llm's clients.

The endpoint contract carries one string each way, so messages become the request's
``prompt`` through a formatter (a plain transcript by default, or your callable), and can
also travel as a ``"messages"`` extra for endpoints that apply their own chat template.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import Field

# LangChain's run ids come from uuid_utils too (langchain_core.utils.uuid wraps it into a
# uuid.UUID, whose str() costs ~2 µs in Python; this one's is native).
from uuid_utils import uuid7

from .._client import AsyncClient
from .._models import Completion
from .._stop import StopMatcher, normalize_stop
from ._base import ModalBase, UnsupportedFeatureError

__all__ = ["ChatModal", "messages_payload", "transcript"]

MessageFormatter = Callable[[Sequence[BaseMessage]], str]

_TRANSCRIPT_ROLES: Final = {"system": "System", "human": "Human", "ai": "AI", "tool": "Tool"}
_PAYLOAD_ROLES: Final = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}

_REFUSED: Final = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "tool calling",
    "function_call": "tool calling",
    "parallel_tool_calls": "tool calling",
    "response_format": "structured output",
    "stream_usage": "token usage",
}
"""Model arguments that would otherwise be sent to the endpoint and quietly ignored."""


def _text(message: BaseMessage) -> str:
    """The message's text; non-text content blocks are refused (the contract is text only)."""
    content = message.content
    if isinstance(content, str):
        return content
    for block in content:
        if isinstance(block, str):
            continue
        kind = block.get("type")
        if kind not in ("text", "reasoning", "thinking"):
            raise UnsupportedFeatureError(
                f"ChatModal sends text only: a {kind!r} content block cannot be carried "
                "by the endpoint contract (prompt in, prompt out)"
            )
    return str(message.text)


def _role(message: BaseMessage, roles: Mapping[str, str]) -> str:
    if isinstance(message, ChatMessage):
        return message.role
    return roles.get(message.type, message.type)


def _human_turn(text: str) -> str:
    """``transcript([HumanMessage(text)])`` without building the message."""
    return f"Human: {text}\nAI:"


def transcript(messages: Sequence[BaseMessage]) -> str:
    """The default formatter: one ``Role: text`` line per message, then ``AI:``.

    Roles are ``System``, ``Human``, ``AI``, ``Tool`` (a ``ChatMessage`` keeps its own),
    the names LangChain's ``get_buffer_string`` uses. The trailing ``AI:`` asks the
    endpoint for the assistant's turn.
    """
    lines = [f"{_role(m, _TRANSCRIPT_ROLES)}: {_text(m)}" for m in messages]
    lines.append("AI:")
    return "\n".join(lines)


def messages_payload(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """The ``"messages"`` extra: ``[{"role": "system"|"user"|"assistant"|"tool", "content"}]``."""
    return [{"role": _role(m, _PAYLOAD_ROLES), "content": _text(m)} for m in messages]


_Reply = str | tuple[str, dict[str, Any]]
"""A reply's text (stop sequences applied), with its keys other than ``prompt`` if any."""


def _reply(completion: Completion, stop: tuple[str, ...] | None) -> _Reply:
    text = completion.text if not stop else StopMatcher(stop).apply(completion.text)
    extra = completion.model_extra
    return (text, extra) if extra else text


def _message(reply: _Reply, **fields: Any) -> AIMessage:
    """The reply as an ``AIMessage``; its other keys go to ``response_metadata`` (a copy:
    pydantic validates the dict into a new one)."""
    text, extra = (reply, {}) if isinstance(reply, str) else reply
    return AIMessage(content=text, response_metadata=extra, **fields)


class ChatModal(ModalBase, BaseChatModel):
    """A Modal LLM web endpoint as a LangChain chat model, over modal-llm's clients.

    Usage::

        chat = ChatModal(endpoint_url="https://me--llm-web.modal.run", max_tokens=128)
        chat.invoke([SystemMessage("Be brief."), HumanMessage("Hi!")])   # -> AIMessage
        chain = ChatPromptTemplate.from_messages([...]) | chat | StrOutputParser()

    Messages become the contract's ``prompt`` through ``formatter`` (default
    ``transcript``); with ``send_messages=True`` they also go as a ``"messages"`` extra.
    ``temperature``, ``max_tokens`` (when set) and ``model_kwargs`` are sent with every
    prompt; ``stop`` is applied by the client. Tool calling, structured output and token
    usage raise ``UnsupportedFeatureError``: the contract cannot carry them. Other keys
    of the endpoint's reply are in the message's ``response_metadata``.
    """

    temperature: float | None = None
    """Sent as ``"temperature"`` when set."""
    max_tokens: int | None = None
    """Sent as ``"max_tokens"`` when set."""
    stop: list[str] | None = None
    """Stop sequences applied by the client to every call (merged with the call's)."""
    formatter: MessageFormatter | None = Field(default=None, exclude=True)
    """``messages -> prompt``; ``None`` uses ``transcript``."""
    send_messages: bool = False
    """Also send the messages as ``"messages": [{"role", "content"}, ...]`` (roles
    ``system``/``user``/``assistant``/``tool``) for endpoints with their own chat template."""

    @property
    def _llm_type(self) -> str:
        return "modal-chat"

    def _check_model_args(self, args: Mapping[str, Any]) -> None:
        for name, feature in _REFUSED.items():
            if args.get(name):
                raise UnsupportedFeatureError(
                    f"ChatModal cannot do {feature} ({name!r} was given): the endpoint "
                    "contract carries one text prompt in and one text out"
                )

    def _field_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.temperature is not None:
            args["temperature"] = self.temperature
        if self.max_tokens is not None:
            args["max_tokens"] = self.max_tokens
        return args

    def _field_stops(self) -> tuple[str, ...]:
        return normalize_stop(self.stop)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """Tracing parameters: ``ls_model_name`` is the call's or ``model_kwargs``' ``model``
        when given, else the endpoint's host."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(self._ls_common(stop, kwargs))  # type: ignore[typeddict-item]
        return params

    # -- refused features ------------------------------------------------------------------

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """Always raises ``UnsupportedFeatureError``: the contract has no tool calls."""
        raise UnsupportedFeatureError(
            "ChatModal cannot call tools: the endpoint contract carries one text prompt in "
            "and one text out, with no tool definitions or tool calls"
        )

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        """Always raises ``UnsupportedFeatureError``: the contract has no schema or JSON mode."""
        raise UnsupportedFeatureError(
            "ChatModal cannot produce structured output: the endpoint contract has no "
            "schema, tool calls or JSON mode (parse the text yourself, e.g. with an "
            "output parser)"
        )

    # -- one request -----------------------------------------------------------------------

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """The prompt and the client's keyword arguments for ``messages``."""
        kwargs.pop("stream", None)  # LangChain's own switch, not a model argument
        params = self._model_args(stop, kwargs)
        prompt = self._prompt(messages)
        if self.send_messages:
            params["messages"] = messages_payload(messages)
        return prompt, params

    def _prompt(self, messages: list[BaseMessage]) -> str:
        formatter = self.formatter or transcript
        prompt = formatter(messages)
        if not isinstance(prompt, str):
            raise UnsupportedFeatureError(
                f"ChatModal's formatter must return a str, not {type(prompt).__name__}"
            )
        return prompt

    def _batch_call(
        self, client: AsyncClient, params: dict[str, Any]
    ) -> Callable[[LanguageModelInput], Awaitable[_Reply]] | None:
        """``abatch``'s call when nothing observes the runs: the reply's text and extra keys.

        ``_batch_results`` makes them ``AIMessage``s once the requests are done. Held as
        a ``str`` (or a tuple) meanwhile, they give CPython's cyclic GC nothing to track;
        the five tracked objects of each message built mid-batch made the young
        collections come often and each walk every request in flight (~20 µs per input
        at concurrency 64, measured).
        """
        if params.pop("stream", None) or self.rate_limiter is not None:
            return None
        if self.output_version not in (None, "v0"):
            return None
        stops = params.pop("stop")
        complete = client.complete
        convert = self._convert_input
        send_messages = self.send_messages
        plain = self.formatter is None  # a str input's transcript needs no message objects

        async def call(item: LanguageModelInput) -> _Reply:
            if plain and isinstance(item, str):
                prompt = _human_turn(item)
                if send_messages:
                    payload = [{"role": "user", "content": item}]
            else:
                messages = convert(item).to_messages()
                prompt = self._prompt(messages)
                if send_messages:
                    payload = messages_payload(messages)
            if send_messages:
                completion = await complete(prompt, **params, messages=payload)
            else:
                completion = await complete(prompt, **params)
            return _reply(completion, stops)

        return call

    def _batch_results(self, replies: list[Any]) -> list[Any]:
        output = self._batch_output
        for index, reply in enumerate(replies):
            if isinstance(reply, (str, tuple)):  # an exception stays in its slot
                replies[index] = output(reply)
        return replies

    def _batch_output(self, reply: _Reply) -> AIMessage:
        # LangChain names a reply after its run ("lc_run--<run id>-<index>").
        return _message(reply, id=f"{LC_ID_PREFIX}-{uuid7()}-0")

    @staticmethod
    def _result(completion: Completion, stop: tuple[str, ...] | None) -> ChatResult:
        message = _message(_reply(completion, stop))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, params = self._request(messages, stop, kwargs)
        stops = params.pop("stop")
        completion = self._blocking_client().complete(prompt, **params)
        return self._result(completion, stops)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, params = self._request(messages, stop, kwargs)
        stops = params.pop("stop")
        client = await self._loop_client()
        completion = await client.complete(prompt, **params)
        return self._result(completion, stops)

    # LangChain's stream()/astream() call on_llm_new_token for each chunk and add the final
    # chunk_position="last" chunk; these only turn the client's pieces into chunks.

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        prompt, params = self._request(messages, stop, kwargs)
        pieces = self._blocking_client().stream(prompt, **params)
        try:
            for piece in pieces:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finally:
            pieces.close()  # an early exit closes the HTTP response now, not at GC

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt, params = self._request(messages, stop, kwargs)
        client = await self._loop_client()
        pieces = client.stream(prompt, **params)
        try:
            async for piece in pieces:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finally:
            await pieces.aclose()
