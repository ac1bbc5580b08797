"""The ``modal-llm`` script as a user runs it (a subprocess): every foreseeable failure is
one line on stderr with its documented exit status, never a traceback; interruptions keep
what finished and say how to resume (issue 12, items 3-8)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from modal_llm.cli import (
    EXIT_BAD_INPUT,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
)
from modal_llm.server import STATS, ServerConfig, create_app, serve, toy_generate
from tests.cli_support import finish, modal_llm, start

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals and /dev/full are POSIX")


def write_prompts(path: Path, count: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(count)),
        "utf-8",
    )
    return path


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL OUTPUT, each a whole JSON object (asserted)."""
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- item 3: malformed URLs, full or unwritable output, unreadable input ------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://[::1:20500/", "one pair of brackets"),
        ("http://127.0.0.1:99999/", "from 1 to 65535"),
        ("htp://example.com/", "must be an http(s) URL"),
    ],
)
async def test_a_malformed_url_is_one_line_and_exit_3(
    tmp_path: Path, url: str, needle: str
) -> None:
    ran = await modal_llm("generate", "--endpoint", url, "hi")
    assert ran.code == EXIT_CONFIG
    ran.one_line_error("is malformed", needle)
    if "[" not in url:
        return  # the kinds differ in the library's check (test_endpoint_url.py); one batch run

    source = write_prompts(tmp_path / "in.jsonl", 2)
    output = tmp_path / "out.jsonl"
    ran = await modal_llm(
        "batch", str(source), "-o", str(output), env={"MODAL_LLM_ENDPOINT_URL": url}
    )
    assert ran.code == EXIT_CONFIG
    ran.one_line_error("is malformed", "$MODAL_LLM_ENDPOINT_URL", needle)
    assert not output.exists()  # nothing is created for a bad command line


async def test_a_full_disk_is_one_line_and_exit_2(tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 3)
    async with serve(ServerConfig()) as url:
        ran = await modal_llm("batch", str(source), "-o", "/dev/full", "--endpoint", url)
    assert ran.code == EXIT_USAGE
    ran.one_line_error("cannot write results to /dev/full", "No space left on device")


async def test_an_output_that_stops_growing_mid_run_keeps_whole_lines_and_resumes(
    tmp_path: Path,
) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 40)
    output = tmp_path / "out.jsonl"
    limit = 1500  # bytes: a few records fit, then every write fails with EFBIG

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    app = create_app(ServerConfig())
    async with serve(app) as url:
        args = ("batch", str(source), "-o", str(output), "--endpoint", url, "--concurrency", "2")
        proc = await start(*args, preexec_fn=small_files)
        ran = await finish(proc)
        assert ran.code == EXIT_USAGE
        line = ran.one_line_error("cannot write results to", "File too large")
        assert "rerun the same command to resume" in line
        first = output.read_text("utf-8").splitlines()
        assert 0 < len(first) < 40
        ran = await modal_llm(*args)
        assert ran.code == EXIT_OK, ran.err
    done = [r for r in records_lenient(output) if "text" in r]
    assert sorted(r["id"] for r in done) == sorted(f"q{i}" for i in range(40))


def records_lenient(path: Path) -> list[dict[str, Any]]:
    """OUTPUT's whole lines (a write cut short by EFBIG may leave one partial line)."""
    out = []
    for line in path.read_text("utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def test_unreadable_input_and_a_directory_as_output(tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 1)
    url = "http://127.0.0.1:9/"
    ran = await modal_llm("batch", str(tmp_path / "nope.jsonl"), "-o", "o.jsonl", "--endpoint", url)
    assert ran.code == EXIT_USAGE
    ran.one_line_error("cannot read INPUT", "nope.jsonl", "No such file")

    ran = await modal_llm(
        "batch", str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--endpoint", url
    )
    assert ran.code == EXIT_USAGE
    ran.one_line_error("cannot read INPUT", "Is a directory")

    somedir = tmp_path / "somedir"
    somedir.mkdir()
    ran = await modal_llm("batch", str(source), "-o", str(somedir), "--endpoint", url)
    assert ran.code == EXIT_USAGE
    ran.one_line_error(f"OUTPUT {somedir} is a directory", "-o names the results file")

    missing_dir = tmp_path / "no-such-dir" / "out.jsonl"
    ran = await modal_llm("batch", str(source), "-o", str(missing_dir), "--endpoint", url)
    assert ran.code == EXIT_USAGE
    ran.one_line_error("cannot create OUTPUT", "does not exist")


# -- item 3: SIGTERM behaves as Ctrl-C -------------------------------------------------------


class HeldEndpoint:
    """Answers the first ``answered`` requests, then holds every later one open."""

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.seen = 0
        self.held = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen += 1
        if self.seen > self.answered:
            self.held.set()
            await asyncio.Event().wait()  # until the client goes away
        return web.json_response({"prompt": toy_generate(body["prompt"])})


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldEndpoint, str]]:
    endpoint = HeldEndpoint(answered=3)
    async with serve(endpoint.app) as url:
        yield endpoint, url


@pytest.mark.parametrize(
    ("suffix", "sig", "code", "name"),
    [
        ("jsonl", signal.SIGTERM, EXIT_TERMINATED, "SIGTERM"),
        ("parquet", signal.SIGTERM, EXIT_TERMINATED, "SIGTERM"),
        ("jsonl", signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C"),
    ],
)
async def test_sigterm_on_batch_flushes_says_so_and_the_rerun_resumes(
    tmp_path: Path,
    held: tuple[HeldEndpoint, str],
    suffix: str,
    sig: signal.Signals,
    code: int,
    name: str,
) -> None:
    endpoint, url = held
    source = write_prompts(tmp_path / "in.jsonl", 12)
    output = tmp_path / f"out.{suffix}"
    args = ("batch", str(source), "-o", str(output), "--concurrency", "2", "--max-retries", "0")
    proc = await start(*args, "--endpoint", url)
    await asyncio.wait_for(endpoint.held.wait(), 30)
    ran = await finish(proc, sig)
    assert ran.code == code
    line = ran.one_line_error(f"interrupted by {name}", prefix="modal-llm: ")
    assert "rerun the same command to resume" in line and str(output) in line

    async with serve(ServerConfig()) as clean_url:
        ran = await modal_llm(*args, "--endpoint", clean_url)
    assert ran.code == EXIT_OK, ran.err
    rows = read_any(output)
    assert sorted(r["id"] for r in rows if r.get("text")) == sorted(f"q{i}" for i in range(12))


def read_any(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return rows
    return records(path)


# -- item 4: duplicate ids; item 5: INPUT is OUTPUT -----------------------------------------


async def test_duplicate_ids_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n'
        '{"id": "a", "prompt": "three"}\n{"prompt": "four"}\n{"id": 4, "prompt": "five"}\n',
        "utf-8",
    )
    output = tmp_path / "out.jsonl"
    app = create_app(ServerConfig())
    async with serve(app) as url:
        ran = await modal_llm("batch", str(source), "-o", str(output), "--endpoint", url)
        assert ran.code == EXIT_USAGE
        ran.one_line_error(
            "duplicate ids in", '"a" on lines 1 and 3', "4 on lines 4 and 5", "nothing was sent"
        )
        assert app[STATS].posts == 0
        assert not output.exists()

        # From a pipe, the check runs as lines come, and stops before sending the duplicate.
        ran = await modal_llm(
            "batch",
            "-",
            "-o",
            str(output),
            "--endpoint",
            url,
            "--concurrency",
            "1",
            stdin=source.read_bytes(),
        )
        assert ran.code == EXIT_USAGE
        assert '"a" on lines 1 and 3' in ran.err and "stopped before sending it" in ran.err
        assert "Traceback" not in ran.err
        assert "three" not in [b["prompt"] for b in app[STATS].bodies]


async def test_input_and_output_the_same_file_by_any_name(tmp_path: Path) -> None:
    source = write_prompts(tmp_path / "in.jsonl", 2)
    before = source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(source)
    os.link(source, tmp_path / "hard.jsonl")
    url = "http://127.0.0.1:9/"
    for output in ("in.jsonl", "link.jsonl", "hard.jsonl", "./in.jsonl"):
        ran = await modal_llm("batch", str(source), "-o", str(tmp_path / output), "--endpoint", url)
        assert ran.code == EXIT_USAGE, output
        ran.one_line_error("INPUT and OUTPUT are the same file", "another file")
    ran = await modal_llm(
        "batch", "-", "-o", str(source), "--endpoint", url, stdin=None
    )  # stdin is /dev/null here: not the same file, nothing to do
    assert ran.code == EXIT_OK
    assert source.read_bytes() == before


# -- item 6: messages that say what to do ----------------------------------------------------


async def test_half_a_credential_names_the_missing_variable(tmp_path: Path) -> None:
    env = {"MODAL_LLM_ENDPOINT_URL": "https://x.modal.run/", "MODAL_LLM_KEY": "wk-1"}
    ran = await modal_llm("generate", "hi", env=env)
    assert ran.code == EXIT_CONFIG
    ran.one_line_error("$MODAL_LLM_KEY is set in the environment", "$MODAL_LLM_SECRET is not")
    ran = await modal_llm(
        "generate",
        "--modal-key",
        "wk-1",
        "hi",
        env={"MODAL_LLM_ENDPOINT_URL": "https://x.modal.run/"},
    )
    assert ran.code == EXIT_CONFIG
    ran.one_line_error("--modal-key was given but not --modal-secret", "$MODAL_LLM_SECRET")
    assert "wk-1" not in ran.err
    # An empty secret counts as missing (never an empty Modal-Secret header).
    ran = await modal_llm(
        "generate",
        "--modal-key",
        "wk-1",
        "--modal-secret",
        "",
        "hi",
        env={"MODAL_LLM_ENDPOINT_URL": "https://x.modal.run/"},
    )
    assert ran.code == EXIT_CONFIG
    ran.one_line_error("--modal-key was given but not --modal-secret", "$MODAL_LLM_SECRET")


async def test_a_stream_cut_mid_reply_says_so() -> None:
    async with serve(ServerConfig(pieces=8, stream_drop_after=3)) as url:
        ran = await modal_llm(
            "generate", "--stream", "--max-retries", "0", "--endpoint", url, "hello there"
        )
    assert ran.code == EXIT_FAILED
    line = ran.one_line_error("the connection closed mid-reply after 3 pieces")
    assert "TransferEncodingError" not in line and "400" not in line
    assert ran.out.endswith("\n") and ran.out.strip()


async def test_a_unary_reply_cut_short_is_no_http_400(tmp_path: Path) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(65536)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
            b'\r\n{"prompt": "par'
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    source = write_prompts(tmp_path / "in.jsonl", 1)
    output = tmp_path / "out.jsonl"
    async with server:
        ran = await modal_llm("generate", "--max-retries", "0", "--endpoint", url, "hi")
        batch = await modal_llm("batch", str(source), "-o", str(output), "--endpoint", url)
    assert ran.code == EXIT_FAILED
    line = ran.one_line_error("the reply was cut short", "closed mid-body", "after 15 of 100 bytes")
    assert "400" not in line and "ContentLengthError" not in line
    assert batch.code == EXIT_FAILED
    [record] = records(output)
    assert "closed mid-body" in record["error"]["message"]
    assert "400" not in record["error"]["message"]


async def test_an_unterminated_json_line_is_named(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "no end\n{"id": "c", "prompt": 1\n',
        "utf-8",
    )
    output = tmp_path / "out.jsonl"
    async with serve(ServerConfig()) as url:
        ran = await modal_llm("batch", str(source), "-o", str(output), "--endpoint", url)
    assert ran.code == EXIT_BAD_INPUT
    assert f"{source}:2: bad input line: not valid JSON: a string is not closed" in ran.err
    assert f"{source}:3: bad input line: not valid JSON: the line ends before the object" in ran.err
    assert "control character" not in ran.err


# -- item 7: an endpoint that does not speak the contract -------------------------------------


async def test_a_non_contract_endpoint_stops_the_batch_early(tmp_path: Path) -> None:
    seen = 0

    async def html(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        return web.Response(text="<html><body>Welcome</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/", html)
    source = write_prompts(tmp_path / "in.jsonl", 200)
    output = tmp_path / "out.jsonl"
    async with serve(app) as url:
        args = ("batch", str(source), "-o", str(output), "--endpoint", url, "--concurrency", "2")
        ran = await modal_llm(*args)
    assert ran.code == EXIT_CONFIG
    ran.one_line_error("does not speak the contract", "check --endpoint")
    assert seen < 20
    assert all(r["error"]["type"] == "ContractError" for r in records(output))


# -- item 8: the smaller ones ----------------------------------------------------------------


async def test_generate_dash_reads_stdin() -> None:
    app = create_app(ServerConfig())
    async with serve(app) as url:
        ran = await modal_llm("generate", "--endpoint", url, "-", stdin=b"a prompt\nof two lines\n")
    assert ran.code == EXIT_OK
    assert app[STATS].bodies[-1]["prompt"] == "a prompt\nof two lines"
    assert ran.out == toy_generate("a prompt\nof two lines") + "\n"


async def test_the_reference_endpoint_refuses_a_body_over_1_mib() -> None:
    async with serve(ServerConfig()) as url:
        ran = await modal_llm("generate", "--endpoint", url, "-", stdin=b"x" * (1024 * 1024))
    assert ran.code == EXIT_FAILED  # docs/server.md: 413, not retried
    # The reason phrase is the server's Python's: "Content Too Large" since 3.13 (RFC 9110).
    ran.one_line_error(f"413 {HTTPStatus(413).phrase}", "1048576")


async def test_help_shows_the_retry_default() -> None:
    ran = await modal_llm("generate", "--help")
    assert ran.code == EXIT_OK
    assert "(default: 3)" in " ".join(ran.out.split())


async def test_the_demo_summary_accounts_for_every_http_request() -> None:
    ran = await modal_llm("demo", "--prompts", "60", "--no-progress")
    assert ran.code == EXIT_OK, ran.err
    found = re.search(
        r"HTTP requests: (\d+) = (\d+) calls \(1 stream \+ 60 prompts\) \+ (\d+) retries"
        r"(?: .* \+ (\d+) result polls)?",
        ran.out,
    )
    assert found is not None, ran.out
    total, calls, retries, polls = (int(group or 0) for group in found.groups())
    assert calls == 61 and total == calls + retries + polls
