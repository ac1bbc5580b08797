"""A contract-conforming LLM endpoint on Modal, with Server-Sent Events streaming.

Deploy it (needs ``pip install modal fastapi`` and a Modal account)::

    modal deploy docs/examples/modal_endpoint.py

Then call the URL Modal prints::

    POST {"prompt": "Hello"}                  -> 200 {"prompt": "<generated text>"}
    POST {"prompt": "Hello", "stream": true}  -> text/event-stream:
                                                 data: {"prompt": "<piece>"} ... data: [DONE]

The request and response logic is plain FastAPI (:func:`handle`, :func:`build_fastapi_app`),
so it runs and is tested without Modal; only the last block of this file needs ``modal``.
Replace :func:`generate_pieces` with your model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

try:
    import modal
except ImportError:  # the handler logic below needs FastAPI only
    modal = None  # type: ignore[assignment]


class GenerateRequest(BaseModel):
    """The contract's request: a prompt, the stream flag, and model arguments."""

    # Unknown model arguments (temperature, ...) are accepted and ignored, never rejected.
    model_config = ConfigDict(extra="allow")

    prompt: str
    stream: bool = False
    max_tokens: int = Field(default=64, ge=1)


def generate_pieces(prompt: str, max_tokens: int = 64) -> Iterator[str]:
    """Stand-in for a model: yields text deltas. Put your engine's token stream here.

    With a real model, load the weights once per container (a ``@app.cls`` with a
    ``@modal.enter()`` method) and stream tokens from it here.
    """
    words = prompt.split()
    reply = (
        f"This is a stand-in for a model. Your prompt had {len(words)} words "
        "and this text is the same whatever they say."
    )
    for index, word in enumerate(reply.split(" ")[:max_tokens]):
        yield word if index == 0 else " " + word


def sse_events(pieces: Iterator[str]) -> Iterator[str]:
    """Frame text deltas as Server-Sent Events, ending with ``data: [DONE]``."""
    try:
        for piece in pieces:
            yield f"data: {json.dumps({'prompt': piece})}\n\n"
    except Exception as exc:
        # A failure mid-stream must not look like a finished reply: send an error event
        # and no [DONE], so the client raises instead of returning partial text.
        yield f"event: error\ndata: {json.dumps({'error': type(exc).__name__})}\n\n"
        return
    yield "data: [DONE]\n\n"


def handle(request: GenerateRequest) -> Response:
    """Answer one contract request: JSON ``{"prompt": text}``, or SSE when it asks to stream."""
    pieces = generate_pieces(request.prompt, max_tokens=request.max_tokens)
    if request.stream:
        # text/event-stream is the media type Modal's proxy delivers without buffering.
        return StreamingResponse(
            sse_events(pieces),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return JSONResponse({"prompt": "".join(pieces)})


def build_fastapi_app() -> FastAPI:
    """The same endpoint as a plain FastAPI app, for tests or any ASGI server."""
    api = FastAPI()
    api.post("/")(handle)
    return api


if modal is not None:
    image = modal.Image.debian_slim().pip_install("fastapi[standard]", "pydantic>=2")
    app = modal.App("modal-llm-example", image=image)

    # Real models: add gpu="L4" (or bigger) to @app.function. A request that runs longer
    # than 150 s gets a 303 to a result URL, which modal-llm follows without re-POSTing.
    @app.function(timeout=600)
    @modal.concurrent(max_inputs=32)
    # Add requires_proxy_auth=True to require the Modal-Key and Modal-Secret headers.
    @modal.fastapi_endpoint(method="POST")
    def web(request: GenerateRequest) -> Response:
        return handle(request)
