"""Kinds of CLI failure, each handled in one place for every command, through the real
``modal-llm`` script: a bad flag value is refused at parse time (one line, exit 2) by its
kind, SIGTERM is Ctrl-C for every command (exit 143), and one failure gives one exit status
whichever command met it (docs/cli.md, "Exit statuses")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from modal_llm.cli import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    main,
)
from modal_llm.server import ServerConfig, serve, toy_generate
from tests.cli_support import MODAL_LLM, Ran, cli_env, finish, modal_llm, start

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")

# -- (a) every flag value is checked by its kind when the command line is parsed ---------------

SERVE_BAD_VALUES = [
    ("--port", "99999", "must be a port from 0 to 65535, not 99999"),
    ("--port", "-5", "must be a port from 0 to 65535, not -5"),
    ("--pieces", "0", "must be at least 1, not 0"),
    ("--rate-limit-every", "-1", "must be at least 0"),
    ("--stream-drop-after", "-3", "must be at least 0"),
    ("--latency", "nan", "expected a finite number"),
    ("--piece-delay", "inf", "expected a finite number"),
    ("--cold-start", "1e300", "must be at most 604800 seconds"),
    ("--work-time", "-1", "must not be negative"),
    ("--hop-time", "0", "must be a positive number of seconds"),
    ("--failure-rate", "2", "must be from 0 to 1"),
    ("--rate-limit-rate", "nan", "expected a finite number"),
    ("--error-status", "200", "must be a 4xx or 5xx status"),
    ("--retry-after", "1\r\nX-Injected: yes", "control character"),
    ("--stream-flag", "", "must not be empty"),
    ("--host", "bad..host", "is not a valid host name"),
    ("--seed", "x", "invalid int value"),
]

CLIENT_BAD_VALUES = [
    ("generate", "--timeout", "-1", "must be a positive number of seconds"),
    ("generate", "--timeout", "nan", "expected a finite number"),
    ("generate", "--timeout", "1e300", "must be at most 604800 seconds"),
    ("generate", "--max-retries", "-1", "must be at least 0"),
    ("generate", "--max-retries", "99999999999999999999", "must be at most 1000"),
    ("generate", "--param", "t=NaN", "NaN is not a JSON number"),
    ("generate", "--param", "t=1e999", "out of range for a JSON number"),
    ("generate", "--stop", "", "must not be empty"),  # only the empty one: "\n\n" is fine
    ("batch", "--concurrency", "0", "must be at least 1"),
    ("batch", "--concurrency", "1000000", "must be at most 10000"),
    ("batch", "--rate", "0", "must be a positive rate"),
    ("batch", "--rate", "1e-300", "one a week"),
    ("batch", "--rate", "inf", "expected a finite number"),
    ("demo", "--prompts", "0", "must be at least 1"),
    ("demo", "--concurrency", "100000", "must be at most 10000"),
]


def client_argv(command: str, flag: str, value: str, output: Path) -> list[str]:
    url = "http://127.0.0.1:9/"  # nothing listens: a value that got through would exit 4
    if command == "generate":
        return [command, "--endpoint", url, f"{flag}={value}", "hi"]
    if command == "batch":
        return [command, "-", "-o", str(output), "--endpoint", url, f"{flag}={value}"]
    return [command, f"{flag}={value}"]


@pytest.mark.parametrize(("flag", "value", "needle"), SERVE_BAD_VALUES)
def test_every_bad_serve_value_is_one_usage_line(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, needle: str
) -> None:
    # In-process main(): the same code as the script (a subprocess each would cost seconds).
    assert main(["serve", "--port", "0", flag, value]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before listening: no URL was printed
    Ran(EXIT_USAGE, "", captured.err).one_line_error(
        f"argument {flag}:", needle, "see 'modal-llm serve --help'", prefix="modal-llm serve: "
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--modal-key", "wk-1"], "--modal-key needs --modal-secret too"),
        (["--modal-secret", "ws-1"], "--modal-secret needs --modal-key too"),
    ],
)
def test_half_a_serve_credential_names_the_flags(
    capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    assert main(["serve", "--port", "0", *flags]) == EXIT_USAGE
    err = capsys.readouterr().err
    Ran(EXIT_USAGE, "", err).one_line_error(needle, prefix="modal-llm serve: error: ")
    assert "1" not in err  # the value given is not echoed


@pytest.mark.parametrize(("command", "flag", "value", "needle"), CLIENT_BAD_VALUES)
def test_every_bad_client_value_is_one_usage_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: str,
    flag: str,
    value: str,
    needle: str,
) -> None:
    output = tmp_path / "out.jsonl"
    assert main(client_argv(command, flag, value, output)) == EXIT_USAGE
    Ran(EXIT_USAGE, "", capsys.readouterr().err).one_line_error(
        f"argument {flag}:", needle, prefix=f"modal-llm {command}: error: "
    )
    assert not output.exists()


async def test_bad_values_through_the_script(tmp_path: Path) -> None:
    """The reviewer's cases, and one per command, as a user runs them."""
    output = tmp_path / "out.jsonl"
    cases = [
        ("--port", ["serve", "--port", "99999"]),
        ("--port", ["serve", "--port", "-5"]),
        ("--latency", ["serve", "--latency", "nan"]),
        ("--timeout", client_argv("generate", "--timeout", "1e300", output)),
        ("--rate", client_argv("batch", "--rate", "0", output)),
    ]
    runs = await asyncio.gather(*(modal_llm(*argv) for _, argv in cases))
    for (flag, argv), ran in zip(cases, runs, strict=True):
        assert ran.code == EXIT_USAGE, (argv, ran.err)
        ran.one_line_error(f"argument {flag}:", prefix=f"modal-llm {argv[0]}: error: ")
    assert not output.exists()


async def test_a_usage_error_is_one_line_for_the_program_too() -> None:
    ran = await modal_llm("generate")  # no PROMPT
    assert ran.code == EXIT_USAGE
    ran.one_line_error("required: PROMPT", prefix="modal-llm generate: error: ")
    ran = await modal_llm("frobnicate")
    assert ran.code == EXIT_USAGE
    ran.one_line_error("invalid choice: 'frobnicate'", prefix="modal-llm: error: ")


async def test_good_edge_values_still_run() -> None:
    """The checks refuse bad values only: port 0 listens, and a zero latency serves."""
    proc = await start("serve", "--port", "0", "--latency", "0", "--failure-rate", "1")
    assert proc.stdout is not None
    url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    assert url.startswith("http://127.0.0.1:")
    ran = await modal_llm("generate", "--endpoint", url, "--max-retries", "0", "hi")
    assert ran.code == EXIT_FAILED  # failure-rate 1: every POST gets 500
    ran.one_line_error("500")
    await finish(proc, signal.SIGTERM)
    assert proc.returncode == 0


# -- (b) SIGTERM is handled as Ctrl-C is, by every command ------------------------------------


@pytest.mark.parametrize(
    ("sig", "code", "name"),
    [(signal.SIGTERM, EXIT_TERMINATED, "SIGTERM"), (signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C")],
)
async def test_a_signal_during_generate_stream_ends_the_partial_line_first(
    sig: signal.Signals, code: int, name: str
) -> None:
    gate = asyncio.Event()
    async with serve(ServerConfig(pieces=6, gate=gate)) as url:
        proc = await start("generate", "--stream", "--endpoint", url, "tell me")
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.read(64), 30)  # the first piece is out
        proc.send_signal(sig)
        rest, err = await asyncio.wait_for(proc.communicate(), 60)
        gate.set()
    assert proc.returncode == code
    printed = (first + rest).decode("utf-8")
    assert printed.endswith("\n") and printed.strip()  # the partial text, its line ended
    assert toy_generate("tell me").startswith(printed.strip())
    Ran(code, printed, err.decode("utf-8")).one_line_error(
        f"interrupted by {name}", prefix="modal-llm: "
    )


async def test_sigterm_while_generate_waits_for_a_reply() -> None:
    arrived = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.Event().wait()  # until the client goes away
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/", hold)
    async with serve(app) as url:
        proc = await start("generate", "--endpoint", url, "hi")
        await asyncio.wait_for(arrived.wait(), 30)
        ran = await finish(proc, signal.SIGTERM)
    assert ran.code == EXIT_TERMINATED
    assert ran.out == ""
    ran.one_line_error("interrupted by SIGTERM", prefix="modal-llm: ")


async def test_sigterm_during_the_demo() -> None:
    proc = await start("demo", "--prompts", "100000", "--concurrency", "4", "--no-progress")
    assert proc.stdout is not None
    while b"fanning out" not in await asyncio.wait_for(proc.stdout.readline(), 30):
        pass
    ran = await finish(proc, signal.SIGTERM)
    assert ran.code == EXIT_TERMINATED
    ran.one_line_error("interrupted by SIGTERM", prefix="modal-llm: ")


def wchan(pid: int) -> str:
    """Where process ``pid`` sleeps in the kernel (Linux), or skip the test."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        pytest.skip("no /proc/PID/wchan here")


async def blocked_reading_a_pipe(pid: int) -> None:
    """Until process ``pid`` sleeps in a pipe read (``anon_pipe_read``/``pipe_read``)."""
    for _ in range(3000):
        if "pipe_read" in wchan(pid):
            return
        await asyncio.sleep(0.01)  # polling: no event tells us the child reached read()
    raise AssertionError("modal-llm never started reading stdin")


@pytest.mark.parametrize(
    ("sig", "code", "name"),
    [(signal.SIGTERM, EXIT_TERMINATED, "SIGTERM"), (signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C")],
)
async def test_a_signal_while_generate_reads_its_prompt_from_stdin(
    sig: signal.Signals, code: int, name: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(MODAL_LLM),
        "generate",
        "--endpoint",
        "http://127.0.0.1:9/",
        "-",
        stdin=asyncio.subprocess.PIPE,  # left open: the prompt never ends
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        await blocked_reading_a_pipe(proc.pid)
        proc.send_signal(sig)
        out, err = await asyncio.wait_for(proc.communicate(), 30)  # stdin still open
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code
    Ran(code, out.decode(), err.decode()).one_line_error(
        f"interrupted by {name}", prefix="modal-llm: "
    )


async def test_sigterm_while_batch_waits_for_more_stdin(tmp_path: Path) -> None:
    """The stdin reader thread is blocked in a read: the process still ends cleanly (it
    used to abort at shutdown, "could not acquire lock for <stdin>")."""
    posted = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        posted.set()
        return web.json_response({"prompt": toy_generate(body["prompt"])})

    app = web.Application()
    app.router.add_post("/", answer)
    output = tmp_path / "out.jsonl"
    async with serve(app) as url:
        proc = await asyncio.create_subprocess_exec(
            str(MODAL_LLM),
            *("batch", "-", "-o", str(output), "--endpoint", url),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        assert proc.stdin is not None
        proc.stdin.write(b'{"id": "a", "prompt": "one"}\n')  # then no more, and no EOF
        await proc.stdin.drain()
        await asyncio.wait_for(posted.wait(), 30)
        ran = await finish(proc, signal.SIGTERM)
    assert ran.code == EXIT_TERMINATED, ran.err
    line = ran.one_line_error("interrupted by SIGTERM", prefix="modal-llm: ")
    assert "rerun the same command to resume" in line


# -- (c) one failure, one exit status, whichever command meets it ----------------------------


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def replying(status: int, body: str, content_type: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_post("/", handle)
    return app


ENDPOINTS: dict[str, Callable[[], web.Application | None]] = {
    "html": lambda: replying(200, "<html><body>Welcome</body></html>", "text/html"),
    "no prompt key": lambda: replying(200, '{"text": "hi"}', "application/json"),
    "401": lambda: replying(401, "missing credentials", "text/plain"),
    "500": lambda: replying(500, "boom", "text/plain"),
    "closed port": lambda: None,
}
EXPECTED = {
    "html": (EXIT_CONFIG, "does not speak the contract"),
    "no prompt key": (EXIT_CONFIG, "does not speak the contract"),
    "401": (EXIT_AUTH, "authentication failed"),
    "500": (EXIT_FAILED, None),  # batch: the items failed (in OUTPUT); generate: it failed
    "closed port": (EXIT_UNREACHABLE, "cannot reach the endpoint"),
}


@pytest.mark.parametrize("kind", list(ENDPOINTS))
async def test_one_failure_has_one_exit_status_in_every_command(tmp_path: Path, kind: str) -> None:
    code, needle = EXPECTED[kind]
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(8)), "utf-8"
    )

    async def commands(url: str) -> dict[str, Ran]:
        common = ("--endpoint", url, "--max-retries", "0")
        runs: dict[str, Awaitable[Ran]] = {
            "generate": modal_llm("generate", *common, "hi"),
            "generate --stream": modal_llm("generate", "--stream", *common, "hi"),
            "batch": modal_llm(
                "batch",
                str(source),
                "-o",
                str(tmp_path / "out.jsonl"),
                *common,
                "--concurrency",
                "1",
            ),
        }
        done = await asyncio.gather(*runs.values())
        return dict(zip(runs, done, strict=True))

    app = ENDPOINTS[kind]()
    if app is None:
        ran = await commands(closed_port_url())
    else:
        async with serve(app) as url:
            ran = await commands(url)
    for command, result in ran.items():
        assert result.code == code, (command, result.err)
        assert "Traceback" not in result.err
        if needle is not None:
            line = result.err.strip().splitlines()[-1]
            assert line.startswith("modal-llm: error: ") and needle in line, (command, line)


# -- stdout that cannot be written is one line and exit 2, in every command ------------------


async def test_a_full_stdout_is_one_line_and_exit_2_in_every_command(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prompt": "hi"}\n', "utf-8")

    async def to_dev_full(*argv: str) -> Ran:
        full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        try:
            proc = await asyncio.create_subprocess_exec(
                str(MODAL_LLM),
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=full,
                stderr=asyncio.subprocess.PIPE,
                env=cli_env(),
            )
        finally:
            os.close(full)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return Ran(proc.returncode, "", err.decode("utf-8"))

    async with serve(ServerConfig(pieces=4)) as url:
        runs = await asyncio.gather(
            to_dev_full("generate", "--endpoint", url, "hi"),
            to_dev_full("generate", "--stream", "--endpoint", url, "hi"),
            to_dev_full("batch", str(source), "-o", "-", "--endpoint", url),
            to_dev_full("demo", "--prompts", "3", "--no-progress"),
        )
    for ran in runs:
        assert ran.code == EXIT_USAGE, ran.err
        ran.one_line_error("cannot write to stdout", "No space left on device")
