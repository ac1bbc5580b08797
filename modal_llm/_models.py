"""The wire contract: the reply model and the one function that parses a reply body.

A reply is ``{"prompt": <generated text>, ...}``. Extra keys are kept, never rejected.
Parsing is one pydantic ``model_validate_json`` call: JSON decoding and validation
happen together in pydantic-core, so the hot path decodes each body exactly once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from ._exceptions import ContractError

__all__ = ["Completion", "parse_reply"]


class Completion(BaseModel):
    """The endpoint's whole reply. ``text`` is the generated text; ``data`` the full JSON.

    Usage::

        reply = await client.complete("Hi")
        reply.text            # the generated text (the reply's "prompt" key)
        reply.data["usage"]   # any other key the endpoint returned
    """

    # Cache keys only: generated texts are unique, so caching them (pydantic-core's default)
    # would only hold up to 16384 of them in memory for the life of the process.
    model_config = ConfigDict(extra="allow", frozen=True, cache_strings="keys")

    prompt: StrictStr
    """The generated text. The contract reuses the key ``prompt`` for the reply."""

    @property
    def text(self) -> str:
        """The generated text."""
        return self.prompt

    @property
    def data(self) -> dict[str, Any]:
        """The full reply object, extra keys included."""
        return {"prompt": self.prompt, **(self.model_extra or {})}


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    if kind == "json_invalid":
        return "reply is not valid JSON"
    if kind == "model_type":
        return "reply is not a JSON object"
    if kind == "missing":
        return 'reply has no "prompt" key'
    return 'reply\'s "prompt" is not a string'


_UTF8_BOM = b"\xef\xbb\xbf"


def parse_reply(body: bytes, *, status_code: int | None = None, url: object = None) -> Completion:
    """Parse a reply body into a ``Completion``, or raise ``ContractError`` saying why.

    A leading UTF-8 byte-order mark is dropped, as every stream decoder does.
    """
    if body[:3] == _UTF8_BOM:
        body = body[3:]
    try:
        return Completion.model_validate_json(body)
    except ValidationError as exc:
        raise ContractError(_describe(exc), status_code=status_code, body=body, url=url) from None
