"""The blocking ``Client`` after ``os.fork()``: the child gets a loop thread and pool of its own.

Each scenario runs in a subprocess (with a timeout, so a hang fails the test rather than the
suite) that makes a ``Client``, uses it, forks, and uses it again in the child and then in
the parent. The endpoint runs in the test's process, so it sees every process's connections.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from .endpoints import ThreadedEndpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")

GUARD = 60.0
"""Seconds a scenario may take; reaching it means a hang."""

PRELUDE = """
import gc, os, sys
from modal_llm import Client, ClientClosedError, Timeout

URL = sys.argv[1]


def echo(prompt):
    return f"{prompt} :: {{}}"


def fork(child):
    '''Run child() in a forked child that exits normally (atexit, finalizers); its status.'''
    pid = os.fork()
    if pid == 0:
        try:
            child()
        except Exception:
            import traceback
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        sys.exit(0)  # a grandchild's exit passes through its parents' frames
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ThreadedEndpoint]:
    server = ThreadedEndpoint()
    yield server
    server.close()


def run_scenario(endpoint: ThreadedEndpoint, body: str) -> list[str]:
    script = PRELUDE + textwrap.dedent(body)
    with subprocess.Popen(
        [sys.executable, "-c", script, endpoint.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hung child is killed with its parent: one group
    ) as process:
        try:
            out, err = process.communicate(timeout=GUARD)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"the scenario hung\n{out}{err}")
    assert process.returncode == 0, out + err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return out.splitlines()


def test_a_client_used_before_the_fork_works_in_the_child_and_still_in_the_parent(
    endpoint: ThreadedEndpoint,
) -> None:
    lines = run_scenario(
        endpoint,
        """
        client = Client(URL, max_retries=0, timeout=Timeout(10))
        assert client.generate("parent") == echo("parent")

        def child():
            assert not client.closed
            assert client.generate("child") == echo("child")
            assert client.generate_many(["c1", "c2"]) == [echo("c1"), echo("c2")]
            assert "".join(client.stream("child stream")) != ""
            print("child", client.pool.connections_idle)
            # What the fork left behind (the parent's loop and pool) is kept alive so that
            # it is never finalized here; were it collected, nothing may reach the parent's
            # epoll or sockets: a transport closed here would unregister the parent's.
            from modal_llm import _portal

            for portal in _portal._FORSAKEN:
                portal.left_behind.clear()  # the parent's AsyncClient, with its pool
            _portal._FORSAKEN.clear()
            gc.collect()

        assert fork(child) == 0
        # The child let go of the parent's pool without closing or unregistering it: the
        # parent's pooled connection still answers.
        assert client.generate("parent again") == echo("parent again")
        print("parent", client.pool.connections_idle)
        client.close()
        assert client.closed
        """,
    )
    assert lines[0].startswith("child ") and lines[1:] == ["parent 1"]
    # The child opened connections of its own: at least one peer that is not the parent's.
    assert len(endpoint.peers) >= 2


def test_forking_twice_and_from_threads_each_child_reopens_once(endpoint: ThreadedEndpoint) -> None:
    run_scenario(
        endpoint,
        """
        import threading
        client = Client(URL, max_retries=0, timeout=Timeout(10))
        assert client.generate("p") == echo("p")

        def grandchild():
            assert client.generate("grandchild") == echo("grandchild")

        def child():
            results = []
            threads = [
                threading.Thread(target=lambda i=i: results.append(client.generate(f"t{i}")))
                for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(results) == sorted(echo(f"t{i}") for i in range(8))
            assert fork(grandchild) == 0
            assert client.generate("child after") == echo("child after")

        assert fork(child) == 0
        assert client.generate("parent after") == echo("parent after")
        """,
    )


def test_what_the_parent_had_in_flight_fails_clearly_in_the_child(
    endpoint: ThreadedEndpoint,
) -> None:
    lines = run_scenario(
        endpoint,
        """
        client = Client(URL, max_retries=0, timeout=Timeout(10))
        pieces = client.stream("a stream opened before the fork")
        first = next(pieces)

        def child():
            try:
                next(pieces)
            except ClientClosedError as exc:
                print(exc)
            else:
                raise AssertionError("the parent's stream went on in the child")
            assert client.generate("child") == echo("child")

        assert fork(child) == 0
        assert [first, *pieces] != []
        closed = Client(URL)
        closed.close()

        def child_of_a_closed_client():
            try:
                closed.generate("x")
            except ClientClosedError:
                print("still closed")

        assert fork(child_of_a_closed_client) == 0
        client = Client(URL)
        assert client.generate("p") == echo("p")

        def child_closing_it_first():
            client.close()
            assert client.closed
            try:
                client.generate("x")
            except ClientClosedError:
                print("closed in the child")

        assert fork(child_closing_it_first) == 0
        assert client.generate("parent") == echo("parent")
        """,
    )
    assert len(lines) == 3
    assert "os.fork()" in lines[0]
    assert lines[1:] == ["still closed", "closed in the child"]
