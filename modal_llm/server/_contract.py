"""The endpoint contract: body validation as FastAPI does it, proxy auth, the toy generator, and
the reply bodies Modal sends (its plain-text errors and FastAPI's ``{"detail": ...}``)."""

from __future__ import annotations

import hmac
import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ._config import STREAM_FORMATS

MISSING_CREDENTIALS = "modal-http: missing credentials for proxy authorization"
# Modal documents only the "missing" body; this one is our choice for a wrong key/secret.
INVALID_CREDENTIALS = "modal-http: invalid credentials for proxy authorization"
INVALID_CALL = "modal-http: invalid function call"
INTERNAL_ERROR = "modal-http: internal error"

# Pydantic's lax-mode booleans, so "stream" validates like the FastAPI endpoint's `bool` field.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def toy_generate(prompt: str, *, echo_prompt: bool = False) -> str:
    """The stand-in for a model: the prompt's words upper-cased in reverse order.

    Deterministic and plainly not a model. The reply does not repeat the prompt (a reply
    without it crashed the old LangChain integration) unless ``echo_prompt`` is set, and
    it carries multibyte UTF-8 on purpose.
    """
    words = prompt.upper().split()
    text = f"🤖 toy reply — {' '.join(reversed(words)) if words else '(EMPTY PROMPT)'} ✓"
    return f"{prompt} {text}" if echo_prompt else text


def split_pieces(text: str, pieces: int) -> list[str]:
    """Split ``text`` into at most ``pieces`` non-empty deltas whose concatenation is ``text``."""
    count = max(1, min(pieces, len(text)))
    size = len(text)
    return [text[i * size // count : (i + 1) * size // count] for i in range(count)]


def split_bytes(data: bytes, pieces: int) -> list[bytes]:
    """Split ``data`` into at most ``pieces`` byte chunks, cutting multibyte characters."""
    count = max(1, min(pieces, len(data)))
    size = len(data)
    return [data[i * size // count : (i + 1) * size // count] for i in range(count)]


def dumps(value: object) -> bytes:
    """Compact UTF-8 JSON, as the endpoint writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def text_reply(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A plain-text reply, the way Modal's proxy answers its own errors."""
    return web.Response(status=status, text=message, headers=headers)


def detail_reply(
    status: int, detail: object, headers: dict[str, str] | None = None
) -> web.Response:
    """A FastAPI-style ``{"detail": ...}`` JSON error reply."""
    return web.Response(
        status=status,
        body=dumps({"detail": detail}),
        content_type="application/json",
        headers=headers,
    )


def is_json_type(content_type: str | None) -> bool:
    """Whether FastAPI would parse a body of this Content-Type as JSON."""
    # FastAPI (strict_content_type, the default) parses the body only for
    # application/json and application/*+json; anything else validates as raw bytes.
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    main_type, _, subtype = mime.partition("/")
    return main_type == "application" and (subtype == "json" or subtype.endswith("+json"))


def lax_bool(value: object) -> bool | None:
    """Pydantic's lax-mode boolean of ``value``; None when it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return None


def validate_body(
    raw: bytes, content_type: str | None, stream_flag: str = "stream"
) -> tuple[dict[str, Any] | None, web.Response | None]:
    """Validate a POST body as the FastAPI endpoint would; return the body or the error reply."""
    if not raw:
        error: dict[str, Any] = {
            "type": "missing",
            "loc": ["body"],
            "msg": "Field required",
            "input": None,
        }
        return None, detail_reply(422, [error])
    value: Any
    if is_json_type(content_type):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            error = {
                "type": "json_invalid",
                "loc": ["body", exc.pos],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
            return None, detail_reply(422, [error])
        except (ValueError, RecursionError):  # not UTF-8, say: FastAPI's catch-all answers 400
            return None, detail_reply(400, "There was an error parsing the body")
    else:
        value = raw.decode("utf-8", "replace")
    if not isinstance(value, dict):
        error = {
            "type": "model_attributes_type",
            "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": value,
        }
        return None, detail_reply(422, [error])
    errors: list[dict[str, Any]] = []
    if "prompt" not in value:
        errors.append(
            {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": value}
        )
    elif not isinstance(value["prompt"], str):
        errors.append(
            {
                "type": "string_type",
                "loc": ["body", "prompt"],
                "msg": "Input should be a valid string",
                "input": value["prompt"],
            }
        )
    if stream_flag in value:
        flag = value[stream_flag]
        if lax_bool(flag) is None:
            parsing = isinstance(flag, (str, int, float)) and not isinstance(flag, bool)
            errors.append(
                {
                    "type": "bool_parsing" if parsing else "bool_type",
                    "loc": ["body", stream_flag],
                    "msg": "Input should be a valid boolean"
                    + (", unable to interpret input" if parsing else ""),
                    "input": flag,
                }
            )
    if "format" in value and value["format"] not in STREAM_FORMATS:
        expected = "'sse', 'ndjson', 'text' or 'json'"
        errors.append(
            {
                "type": "literal_error",
                "loc": ["body", "format"],
                "msg": f"Input should be {expected}",
                "input": value["format"],
                "ctx": {"expected": expected},
            }
        )
    if errors:
        return None, detail_reply(422, errors)
    return value, None


def check_credentials(request: web.Request, key: str, secret: str) -> web.Response | None:
    """Modal's proxy auth: None when Modal-Key/Modal-Secret match, else the 401 reply."""
    sent_key = request.headers.get("Modal-Key")
    sent_secret = request.headers.get("Modal-Secret")
    if sent_key is None or sent_secret is None:
        return text_reply(401, MISSING_CREDENTIALS)
    key_ok = hmac.compare_digest(sent_key.encode(), key.encode())
    secret_ok = hmac.compare_digest(sent_secret.encode(), secret.encode())
    if not (key_ok and secret_ok):
        return text_reply(401, INVALID_CREDENTIALS)
    return None


def status_reply(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """Modal's plain-text reply for an error ``status`` ("modal-http: too many requests")."""
    try:
        reason = HTTPStatus(status).phrase.lower()
    except ValueError:
        reason = "error"
    return text_reply(status, f"modal-http: {reason}", headers)


def json_reply(body: bytes) -> web.Response:
    """A 200 reply with an already-encoded JSON ``body``."""
    return web.Response(body=body, content_type="application/json")


def reply_body(prompt: str, text: str) -> bytes:
    """The JSON body of a non-streaming reply: ``{"prompt": text, "model", "usage"}``."""
    usage = {"prompt_chars": len(prompt), "completion_chars": len(text)}
    return dumps({"prompt": text, "model": "toy", "usage": usage})
