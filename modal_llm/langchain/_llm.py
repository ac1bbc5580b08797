"""LangChain ``Modal`` LLM backed by modal-llm's clients (the ``langchain`` extra).

A drop-in replacement for ``langchain_community.llms.Modal``::

    from modal_llm.langchain import Modal

    llm = Modal(endpoint_url="https://me--llm-web.modal.run", model_kwargs={"max_tokens": 128})
    chain = PromptTemplate.from_template("Question: {q}\\nAnswer:") | llm
    await chain.ainvoke({"q": "..."})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from .._batch import gather_bounded
from .._client import AsyncClient
from ._base import ModalBase

__all__ = ["Modal"]


class Modal(ModalBase, LLM):
    """A Modal LLM web endpoint as a LangChain LLM, backed by modal-llm's pooled clients.

    Usage::

        llm = Modal(endpoint_url="https://me--llm-web.modal.run", model_kwargs={"max_tokens": 64})
        llm.invoke("Identify yourself, bot!")
        await llm.abatch(prompts, config={"max_concurrency": 8})

    Fields (``endpoint_url``, ``model_kwargs``, ``modal_key``/``modal_secret``,
    ``max_concurrency``, ``max_retries``, ``timeout``, ``streaming``, ``stream_flag``) are
    described in docs/langchain.md. Unknown keyword arguments are moved into
    ``model_kwargs`` with a ``UserWarning`` (as ``langchain_community.llms.Modal`` does,
    but with a warning instead of a log line). Settings are validated at construction.
    """

    @property
    def _llm_type(self) -> str:
        return "modal"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """Tracing parameters: ``ls_model_name`` is ``model_kwargs["model"]`` when given,
        else the endpoint's host."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(self._ls_common(stop, kwargs))  # type: ignore[typeddict-item]
        return params

    # -- LangChain's hooks -----------------------------------------------------------------

    def _batch_call(
        self, client: AsyncClient, params: dict[str, Any]
    ) -> Callable[[LanguageModelInput], Awaitable[str]]:
        """``abatch``'s call when nothing observes the runs: what ``ainvoke`` returns."""
        generate = client.generate
        convert = self._convert_input

        async def call(item: LanguageModelInput) -> str:
            prompt = item if isinstance(item, str) else convert(item).to_string()
            return await generate(prompt, **params)

        return call

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        if self.streaming:
            return "".join(
                chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs)
            )
        return self._blocking_client().generate(prompt, **self._model_args(stop, kwargs))

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        if self.streaming:
            pieces = [
                chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)
            ]
            return "".join(pieces)
        client = await self._loop_client()
        return await client.generate(prompt, **self._model_args(stop, kwargs))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        pieces = self._blocking_client().stream(prompt, **self._model_args(stop, kwargs))
        try:
            for piece in pieces:
                chunk = GenerationChunk(text=piece)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # an early exit closes the HTTP response now, not at GC

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        client = await self._loop_client()
        pieces = client.stream(prompt, **self._model_args(stop, kwargs))
        try:
            async for piece in pieces:
                chunk = GenerationChunk(text=piece)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await pieces.aclose()

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Several prompts go out concurrently through ``generate_many``, not one by one."""
        if self.streaming or len(prompts) == 1:
            texts = [self._call(prompt, stop, run_manager, **kwargs) for prompt in prompts]
        else:
            texts = self._blocking_client().generate_many(prompts, **self._model_args(stop, kwargs))
        return LLMResult(generations=[[Generation(text=text)] for text in texts])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Several prompts go out concurrently (LangChain's ``LLM`` awaits them in turn)."""
        if self.streaming:

            async def one(prompt: str) -> str:
                return await self._acall(prompt, stop, run_manager, **kwargs)

            texts: list[Any] = await gather_bounded(one, prompts, concurrency=self._cap())
        else:
            client = await self._loop_client()
            params = self._model_args(stop, kwargs)
            if len(prompts) == 1:  # ainvoke: no fan-out machinery for a single prompt
                texts = [await client.generate(prompts[0], **params)]
            else:
                texts = await client.generate_many(prompts, **params)
        return LLMResult(generations=[[Generation(text=text)] for text in texts])
