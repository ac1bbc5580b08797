"""The ``modal-llm`` command, end to end against the reference endpoint on 127.0.0.1.

``main()`` runs its own event loop, so the async tests run it in a thread while their
own loop serves the endpoint; what the server saw (request bodies, headers) is the proof.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modal_llm.cli import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    main,
)
from modal_llm.server import STATS, ServerConfig, create_app, serve, toy_generate
from tests.cli_support import MODAL_LLM

KEY, SECRET = "wk-test", "ws-not-a-real-secret"


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("modal-llm: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in err


# -- generate ---------------------------------------------------------------------------------


async def test_generate_prints_the_answer(capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(ServerConfig()) as url:
        assert await run_cli("generate", "--endpoint", url, "hello world") == EXIT_OK
    assert capsys.readouterr().out == toy_generate("hello world") + "\n"


async def test_generate_streams_with_params_and_stop(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(ServerConfig(pieces=6))
    async with serve(app) as url:
        monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", url)
        code = await run_cli(
            "generate",
            "--stream",
            "--param",
            "max_tokens=5",
            "--param",
            "temperature=0.5",
            "--param",
            "style=terse",
            "--param",
            'opts={"a": [1, null]}',
            "--stop",
            "—",
            "tell me",
        )
    assert code == EXIT_OK
    assert capsys.readouterr().out == toy_generate("tell me").split("—")[0] + "\n"
    assert app[STATS].bodies[-1] == {
        "prompt": "tell me",
        "stream": True,
        "max_tokens": 5,
        "temperature": 0.5,
        "style": "terse",
        "opts": {"a": [1, None]},
    }


@pytest.mark.parametrize("stop", ["\n\n", "\n", " "])
async def test_a_whitespace_stop_sequence_works_as_in_the_docs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    # docs/cli.md: modal-llm generate "Tell me a story" --stream --stop $'\n\n' (review R10)
    from modal_llm.testing import local_endpoint

    async with local_endpoint(script=[f"Once{stop}upon a time"], pieces=3) as endpoint:
        monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", endpoint.url)
        code = await run_cli("generate", "Tell me a story", "--stream", "--stop", stop)
    assert code == EXIT_OK
    assert capsys.readouterr().out == "Once\n"


async def test_generate_auth_from_env_or_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(ServerConfig(modal_key=KEY, modal_secret=SECRET))
    async with serve(app) as url:
        assert await run_cli("generate", "--endpoint", url, "hi") == EXIT_AUTH
        err = capsys.readouterr().err
        assert_one_line_error(err, "authentication failed", "missing credentials", "MODAL_LLM_KEY")

        args = ("generate", "--endpoint", url, "--modal-key", KEY, "--modal-secret", "wrong", "hi")
        assert await run_cli(*args) == EXIT_AUTH
        err = capsys.readouterr().err
        assert "invalid credentials" in err and "wrong" not in err and KEY not in err

        assert await run_cli(*args[:-3], "--modal-secret", SECRET, "hi") == EXIT_OK
        monkeypatch.setenv("MODAL_LLM_KEY", KEY)
        monkeypatch.setenv("MODAL_LLM_SECRET", SECRET)
        assert await run_cli("generate", "--endpoint", url, "hi") == EXIT_OK
        assert app[STATS].last_headers["Modal-Key"] == KEY
    out = capsys.readouterr().out
    assert out == 2 * (toy_generate("hi") + "\n")


@pytest.mark.parametrize(
    ("argv", "code", "needles"),
    [
        (["--endpoint", "ftp://example.com/"], EXIT_CONFIG, ["must be an http(s) URL"]),
        ([], EXIT_CONFIG, ["no endpoint", "MODAL_LLM_ENDPOINT_URL"]),
        (["--endpoint", "http://127.0.0.1:1/", "--modal-key", "k"], EXIT_CONFIG, ["together"]),
        (["--endpoint", "http://127.0.0.1:{port}/"], EXIT_UNREACHABLE, ["cannot reach"]),
    ],
)
async def test_generate_error_exit_codes(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, needles: list[str]
) -> None:
    argv = [a.format(port=closed_port()) for a in argv]
    assert await run_cli("generate", "--max-retries", "0", *argv, "hi") == code
    assert_one_line_error(capsys.readouterr().err, *needles)


async def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("generate", "--param", "no-equals-sign", "hi") == EXIT_USAGE
    assert "expected key=value" in capsys.readouterr().err
    assert await run_cli("generate", "--param", "timeout=5", "hi") == EXIT_USAGE
    assert "names a client option, not a model argument: use --timeout" in capsys.readouterr().err
    assert await run_cli("batch", "in.jsonl") == EXIT_USAGE  # no -o
    assert await run_cli() == EXIT_USAGE
    assert "demo" in capsys.readouterr().err
    assert await run_cli("--help") == EXIT_OK
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "generate", "batch", "serve", "exit status"))


def test_the_entry_points_are_one_program() -> None:
    from modal_llm import __version__

    proc = subprocess.run([str(MODAL_LLM), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"modal-llm {__version__}\n")
    for module in ("modal_llm", "modal_llm.cli"):
        cmd = [sys.executable, "-m", module, "--help"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "exit status" in proc.stdout


def test_serve_is_the_reference_endpoint_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--pieces", "0"]) == 2
    assert "argument --pieces: must be at least 1, not 0" in capsys.readouterr().err


# -- batch ------------------------------------------------------------------------------------


async def test_batch_jsonl_with_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b'{"id": "a", "prompt": "first one", "temperature": 0.1}\n'
        b"this is not json\n"
        b'{"prompt": "no id here"}\n'
        b"[1, 2]\n"
        b"\n"
        b'{"id": "c"}\n'
        b'{"id": [1], "prompt": "x"}\n'
        b'{"id": "d", "prompt": "bad \xff utf8"}\n'
        b'{"id": "e", "prompt": "last"}\n'
    )
    output = tmp_path / "out.jsonl"
    app = create_app(ServerConfig())
    async with serve(app) as url:
        code = await run_cli(
            "batch", str(source), "-o", str(output), "--endpoint", url, "--param", "max_tokens=9"
        )
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    for lineno in (2, 4, 6, 7, 8):
        assert f"{source}:{lineno}: bad input line" in err
    assert "Traceback" not in err
    records = {r["id"]: r for r in read_jsonl(output)}
    assert set(records) == {"a", 3, "e"}  # no id: the line number
    assert records["a"]["text"] == toy_generate("first one")
    assert records["a"]["attempts"] == 1 and records["a"]["latency"] >= 0
    bodies = {b["prompt"]: b for b in app[STATS].bodies}
    assert bodies["first one"] == {"prompt": "first one", "temperature": 0.1, "max_tokens": 9}
    assert bodies["last"] == {"prompt": "last", "max_tokens": 9}


async def test_batch_text_lines_in_order(tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("alpha\n\nbeta gamma\r\n{not json, just text}\n" + "x\n" * 30, "utf-8")
    output = tmp_path / "out.jsonl"
    async with serve(ServerConfig(pieces=2)) as url:
        args = ("batch", str(source), "-o", str(output), "--endpoint", url, "--ordered")
        assert await run_cli(*args, "--format", "text", "--concurrency", "4") == EXIT_OK
    records = read_jsonl(output)
    assert [r["id"] for r in records] == [1, 3, 4, *range(5, 35)]
    assert records[1]["text"] == toy_generate("beta gamma")
    assert records[2]["text"] == toy_generate("{not json, just text}")


async def test_batch_resumes_an_interrupted_run(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(8)),
        "utf-8",
    )
    output = tmp_path / "out.jsonl"
    # What a crashed first run left: three results, a failure, a line cut short.
    output.write_text(
        '{"id": "q0", "text": "done before", "attempts": 1, "latency": 0.1}\n'
        '{"id": "q1", "text": "done before", "attempts": 1, "latency": 0.1}\n'
        '{"id": "q3", "error": {"type": "ServerError", "message": "503"}, "attempts": 4}\n'
        '{"id": "q4", "text": "done before", "attempts": 1, "latency": 0.1}\n'
        '{"id": "q5", "text": "cut sh',
        "utf-8",
    )
    app = create_app(ServerConfig())
    async with serve(app) as url:
        assert await run_cli("batch", str(source), "-o", str(output), "--endpoint", url) == 0
        sent = sorted(body["prompt"] for body in app[STATS].bodies)
        assert sent == ["prompt 2", "prompt 3", "prompt 5", "prompt 6", "prompt 7"]

        assert await run_cli("batch", str(source), "-o", str(output), "--endpoint", url) == 0
        assert app[STATS].posts == 5  # the second rerun had nothing left to do

    lines = output.read_text("utf-8").splitlines()
    assert lines[4] == '{"id": "q5", "text": "cut sh'  # left in place, ignored
    records = [json.loads(line) for line in lines[5:]]
    assert sorted(r["id"] for r in records) == ["q2", "q3", "q5", "q6", "q7"]
    assert all(r["text"] == toy_generate(f"prompt {r['id'][1:]}") for r in records)


async def test_batch_failures_exit_1_and_a_rerun_retries_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(f"prompt {i}\n" for i in range(6)), "utf-8")
    output = tmp_path / "out.jsonl"
    app = create_app(ServerConfig(error_burst=2, error_status=500))
    async with serve(app) as url:
        args = ("batch", str(source), "-o", str(output), "--endpoint", url, "--max-retries", "0")
        assert await run_cli(*args, "--concurrency", "1", "--ordered") == EXIT_FAILED
        records = read_jsonl(output)
        assert [r["id"] for r in records] == [1, 2, 3, 4, 5, 6]
        for record in records[:2]:
            assert record["error"]["type"] == "ServerError"
            assert record["error"]["status"] == 500
            assert record["error"]["message"].startswith("500 Internal Server Error from http")
            assert "text" not in record
        assert "4 succeeded, 2 failed, 0 retries" in capsys.readouterr().err

        assert await run_cli(*args) == EXIT_OK
        # Sent concurrently: they may reach the server in either order.
        assert sorted(b["prompt"] for b in list(app[STATS].bodies)[6:]) == ["prompt 0", "prompt 1"]
    assert "2 succeeded, 0 failed, 0 retries, 4 already done" in capsys.readouterr().err


async def test_batch_summary_counts_retries_through_the_event_hooks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a\nb\nc\n", "utf-8")
    app = create_app(ServerConfig(error_burst=2, error_status=503, retry_after="0"))
    async with serve(app) as url:
        args = ("batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--endpoint", url)
        assert await run_cli(*args, "--concurrency", "1") == EXIT_OK
    assert "3 succeeded, 0 failed, 2 retries" in capsys.readouterr().err
    assert app[STATS].posts == 5


async def test_batch_stops_on_auth_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(f"p{i}\n" for i in range(200)), "utf-8")
    output = tmp_path / "out.jsonl"
    app = create_app(ServerConfig(modal_key=KEY, modal_secret=SECRET))
    async with serve(app) as url:
        # One connection: a connection still being opened when the batch aborts may be
        # accepted by the endpoint as it shuts down, and then left unclosed.
        args = ("batch", str(source), "-o", str(output), "--endpoint", url, "--concurrency", "1")
        assert await run_cli(*args) == EXIT_AUTH
        assert app[STATS].posts < 10
    assert_one_line_error(
        capsys.readouterr().err, "authentication failed", "rerun the same command to resume"
    )
    assert read_jsonl(output)[0]["error"]["type"] == "AuthenticationError"


async def test_batch_stops_when_the_endpoint_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a\nb\nc\n", "utf-8")
    url = f"http://127.0.0.1:{closed_port()}/"
    args = ("batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--endpoint", url)
    assert await run_cli(*args, "--max-retries", "0") == EXIT_UNREACHABLE
    assert_one_line_error(capsys.readouterr().err, "cannot reach the endpoint")


async def test_batch_reads_stdin_and_writes_stdout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b'{"id": 7, "prompt": "from stdin"}\n{"prompt": 5}\n'))
    monkeypatch.setattr(sys, "stdin", stdin)
    async with serve(ServerConfig()) as url:
        assert await run_cli("batch", "-", "-o", "-", "--endpoint", url) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    [record] = [json.loads(line) for line in captured.out.splitlines()]
    assert record["id"] == 7 and record["text"] == toy_generate("from stdin")
    assert "<stdin>:2: bad input line" in captured.err


async def test_batch_progress_counter_without_tqdm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    source = tmp_path / "in.txt"
    source.write_text("a\nb\nc\n", "utf-8")
    output = tmp_path / "out.jsonl"
    async with serve(ServerConfig()) as url:
        args = ("batch", str(source), "-o", str(output), "--endpoint", url)
        code = await run_cli(*args, "--progress", "--rate", "500")
    assert code == EXIT_OK
    err = capsys.readouterr().err
    assert "pip install tqdm" in err and "3/3 done, 0 failed" in err


async def test_batch_file_errors_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("-o", str(tmp_path / "out.jsonl"), "--endpoint", "http://127.0.0.1:9/")
    assert await run_cli("batch", str(tmp_path / "missing.txt"), *args) == EXIT_USAGE
    assert_one_line_error(capsys.readouterr().err, "cannot read", "missing.txt")
    source = tmp_path / "in.txt"
    source.write_text("a\n", "utf-8")
    out_dir = tmp_path / "a-directory"
    out_dir.mkdir()
    code = await run_cli("batch", str(source), "-o", str(out_dir), "--endpoint", "http://x/")
    assert code == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


# -- demo -------------------------------------------------------------------------------------


def test_demo_without_tqdm_falls_back_to_a_counter(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["demo", "--prompts", "40"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "40/40 done, 0 failed" in captured.err
    assert "HTTP requests:" in captured.out and "(1 stream + 40 prompts)" in captured.out
    assert toy_generate("Explain in one breath why the sky is blue") in captured.out


def test_demo_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modal_llm", "demo"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    summary = {line.split(":")[0]: line for line in lines if ":" in line}
    assert "301 calls (1 stream + 300 prompts)" in summary["HTTP requests"]
    assert summary["errors"] == "errors:        0"
    assert "retries" in summary["HTTP requests"]
    assert "prompts/s" in summary["throughput"]
    assert "p50" in summary["latency"] and "p95" in summary["latency"]
    assert "streaming:" in proc.stdout and "Traceback" not in proc.stderr
