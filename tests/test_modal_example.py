"""docs/examples/modal_endpoint.py: its FastAPI handler, run without Modal, and the
reference server's FastAPI-style validation checked against real FastAPI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from modal_llm.server import validate_body

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "modal_endpoint.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("modal_llm_docs_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # pydantic resolves the model's annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture
def client() -> Any:
    with TestClient(example.build_fastapi_app()) as test_client:
        yield test_client


def test_plain_reply_follows_the_contract(client: Any) -> None:
    resp = client.post("/", json={"prompt": "Identify yourself, bot!", "temperature": 0.2})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    data = resp.json()
    assert isinstance(data["prompt"], str)
    assert data["prompt"]
    assert "Identify yourself" not in data["prompt"]


def test_stream_is_sse_with_done(client: Any) -> None:
    plain = client.post("/", json={"prompt": "a b c"}).json()["prompt"]
    resp = client.post("/", json={"prompt": "a b c", "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e.removeprefix("data: "))["prompt"] for e in events[:-1]]
    assert len(pieces) > 1
    assert "".join(pieces) == plain


def test_max_tokens_limits_the_pieces(client: Any) -> None:
    resp = client.post("/", json={"prompt": "x", "stream": True, "max_tokens": 2})
    events = [e for e in resp.text.split("\n\n") if e]
    assert len(events) == 3


def test_error_mid_stream_is_an_error_event() -> None:
    def failing() -> Any:
        yield "partial"
        raise RuntimeError("model crashed")

    events = list(example.sse_events(failing()))
    assert events[0] == 'data: {"prompt": "partial"}\n\n'
    assert events[-1].startswith("event: error\n")
    assert not any("[DONE]" in e for e in events)


def test_modal_app_is_defined_when_modal_is_installed() -> None:
    if example.modal is None:
        pytest.skip("modal is not installed")
    assert example.app.name == "modal-llm-example"


BODIES = [
    b"",
    b"not json",
    b'{"prompt": ',
    b"[1, 2]",
    b"null",
    b'"text"',
    b"{}",
    b'{"prompt": 3}',
    b'{"prompt": null}',
    b'{"prompt": "x", "stream": "maybe"}',
    b'{"prompt": "x", "stream": []}',
    b'{"prompt": "x", "stream": 2}',
    b'{"stream": "maybe", "other": 1}',
    b'{"prompt": "\xff"}',
]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(body, "application/json") for body in BODIES]
    # FastAPI itself fails with a 500 on a non-UTF-8 body that is not JSON: not compared.
    + [(body, "text/plain") for body in BODIES if b"\xff" not in body],
)
def test_reference_server_validates_like_fastapi(
    client: Any, body: bytes, content_type: str
) -> None:
    real = client.post("/", content=body, headers={"content-type": content_type})
    _, ours = validate_body(body, content_type)
    assert ours is not None
    assert real.status_code == ours.status
    assert isinstance(ours.body, bytes)
    assert json.loads(ours.body) == real.json()


@pytest.mark.parametrize("flag", [True, False, "true", "no", 1, 0, "on"])
def test_reference_server_accepts_the_booleans_fastapi_accepts(client: Any, flag: object) -> None:
    body = json.dumps({"prompt": "x", "stream": flag}).encode()
    assert client.post("/", content=body, headers={"content-type": "application/json"}).is_success
    assert validate_body(body, "application/json") == ({"prompt": "x", "stream": flag}, None)
