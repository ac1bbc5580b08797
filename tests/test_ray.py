"""modal_llm.ray: the Generator callable class in-process, then generate() on a local Ray.

The Ray tests share one ``ray.init(num_cpus=2)`` (module-scoped: its startup is paid once)
and talk to the reference endpoint run as a subprocess, as a cluster would reach it.
"""

from __future__ import annotations

import asyncio
import gc
import glob
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from aiohttp import web  # noqa: E402
from ray.data.expressions import col  # noqa: E402

from modal_llm import ClientClosedError, ConfigError, ServerError  # noqa: E402
from modal_llm.ray import RESULT_COLUMNS, RESULT_SCHEMA, Generator, generate  # noqa: E402
from modal_llm.server import STATS, ServerConfig, create_app, serve  # noqa: E402
from modal_llm.testing import endpoint_process  # noqa: E402

pytestmark = pytest.mark.ray

KEY = "wk-ray-test-7f3a9c"
SECRET = "ws-ray-test-e41b2d-do-not-leak"


def _table(rows: int, **columns: list[Any]) -> Any:
    return pa.table({"id": list(range(rows)), "prompt": [f"p{i}" for i in range(rows)], **columns})


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


# -- the callable class, in-process (no Ray cluster) -------------------------------------------


async def test_rows_get_typed_result_columns_and_row_errors() -> None:
    app = create_app(ServerConfig())
    async with serve(app) as url:
        gen = Generator(url, extra_column="args", model_kwargs={"max_tokens": 5, "top_k": 2})
        args = ['{"max_tokens": 9}', None, "not json", "[1]", '{"prompt": "x"}', None]
        batch = _table(6, args=args).set_column(1, "prompt", [["a", None, "c", "d", "e", "f"]])
        out = await gen(batch)
        await gen.aclose()
    assert out.schema == pa.schema([*batch.schema, *RESULT_SCHEMA])
    rows = out.to_pylist()
    assert [r["text"] is not None for r in rows] == [True, False, False, False, False, True]
    assert rows[0]["status"] == 200 and rows[0]["attempts"] == 1 and rows[0]["error"] is None
    assert rows[0]["latency_s"] > 0
    assert [r["error_type"] for r in rows[1:5]] == ["ConfigError"] * 4
    assert rows[1]["error"] == "'prompt' is null"
    assert "not valid JSON" in rows[2]["error"]
    assert "JSON object" in rows[3]["error"]
    assert "must not contain 'prompt'" in rows[4]["error"]
    assert all(r["attempts"] == 0 and r["status"] is None for r in rows[1:5])
    # The row's own arguments win over model_kwargs; only rows that were sent reached it.
    bodies = sorted(app[STATS].bodies, key=lambda b: b["prompt"])
    assert bodies == [
        {"prompt": "a", "max_tokens": 9, "top_k": 2},
        {"prompt": "f", "max_tokens": 5, "top_k": 2},
    ]
    assert gen.rows == 6 and gen.failed == 4


async def test_struct_extras_leave_null_fields_out_and_result_columns_are_replaced() -> None:
    app = create_app(ServerConfig())
    async with serve(app) as url:
        gen = Generator(url, extra_column="args")
        args = pa.array(
            [{"temperature": 0.5, "seed": None}, {"temperature": None, "seed": 3}],
            pa.struct([("temperature", pa.float64()), ("seed", pa.int64())]),
        )
        stale = pa.array(["old", "old"])
        batch = _table(2, args=args, text=stale, error=stale)
        out = await gen(batch)
        await gen.aclose()
    assert out.column_names == ["id", "prompt", "args", *RESULT_COLUMNS]
    assert "old" not in out.column("text").to_pylist()
    assert out.column("error").null_count == 2
    bodies = sorted(app[STATS].bodies, key=lambda b: b["prompt"])
    assert bodies == [{"prompt": "p0", "temperature": 0.5}, {"prompt": "p1", "seed": 3}]


async def test_pandas_dict_and_empty_batches() -> None:
    async with serve(ServerConfig()) as url:
        gen = Generator(url)
        from_dict = await gen({"prompt": pa.array(["x", "y"]).to_numpy(zero_copy_only=False)})
        from_pandas = await gen(_table(3).to_pandas())
        empty = await gen(_table(0).cast(_table(1).schema))
        await gen.aclose()
    assert from_dict.column("text").null_count == 0 and from_dict.num_rows == 2
    assert from_pandas.column("id").to_pylist() == [0, 1, 2]
    assert empty.num_rows == 0
    assert empty.schema == pa.schema([*_table(1).schema, *RESULT_SCHEMA])


async def test_a_missing_or_non_string_prompt_column_fails_the_batch() -> None:
    gen = Generator("http://127.0.0.1:9/")
    with pytest.raises(ConfigError, match="no prompt column 'text'"):
        await Generator("http://127.0.0.1:9/", prompt_column="text")(_table(1))
    with pytest.raises(ConfigError, match="must hold strings, not int64"):
        await gen(pa.table({"prompt": [1, 2]}))


async def test_raise_on_error_raises_the_first_failed_rows_error() -> None:
    async with serve(ServerConfig(error_burst=1, error_status=500)) as url:
        gen = Generator(url, raise_on_error=True, client_options={"max_retries": 0})
        with pytest.raises(ServerError, match="500"):
            await gen(_table(20))
        await gen.aclose()


async def test_an_error_that_is_not_a_modal_llm_error_propagates() -> None:
    async with serve(ServerConfig()) as url:
        gen = Generator(url, model_kwargs={"max_tokens": 4})

        async def broken(*args: object, **kwargs: object) -> Any:
            raise ZeroDivisionError("a bug")
            yield  # an async generator, like map's

        gen.client.map = broken  # type: ignore[method-assign]
        with pytest.raises(ZeroDivisionError):
            await gen(_table(3))


@pytest.mark.parametrize(
    "options",
    [
        {"modal_key": KEY, "modal_secret": SECRET},
        {"headers": {"Modal-Secret": SECRET}},
        {"headers": {"authorization": f"Bearer {SECRET}"}},
        {"headers": {"X-Api-Key": SECRET}},  # any header the client masks (review R3)
        {"headers": {"x-auth-token": SECRET}},
    ],
)
@pytest.mark.usefixtures("local_ray")  # ray.data.from_items would start a Ray of its own
def test_credentials_are_refused_as_arguments(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="runtime_env") as info:
        Generator("http://127.0.0.1:9/", client_options=options)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError, match="runtime_env"):
        generate(ray.data.from_items([{"prompt": "x"}]), "http://127.0.0.1:9/", **options)


def test_modals_routing_header_is_not_a_credential() -> None:
    # Contract section 3's per-request header (review R17).
    headers = {"Modal-Routing-Affinity-Key": "conversation-42"}
    Generator("http://127.0.0.1:9/", client_options={"headers": headers})


@pytest.mark.parametrize(
    "url", [f"http://127.0.0.1:9/?token={SECRET}", f"http://user:{SECRET}@127.0.0.1:9/"]
)
@pytest.mark.usefixtures("local_ray")
def test_an_endpoint_url_with_credentials_is_refused_as_an_argument(url: str) -> None:
    with pytest.raises(ConfigError, match="MODAL_LLM_ENDPOINT_URL") as info:
        Generator(url)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError, match="MODAL_LLM_ENDPOINT_URL"):
        generate(ray.data.from_items([{"prompt": "x"}]), url)


@pytest.mark.usefixtures("local_ray")
def test_the_drivers_endpoint_url_with_credentials_is_not_pickled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", f"http://127.0.0.1:9/?token={SECRET}")
    ds = ray.data.from_items([{"prompt": "x"}])
    assert SECRET.encode() not in ray.cloudpickle.dumps(generate(ds, spread=False))
    monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", "http://127.0.0.1:9/no-credential-here")
    control = ray.cloudpickle.dumps(generate(ds, spread=False))
    assert b"no-credential-here" in control  # such a URL is pickled: the test sees into the plan


@pytest.mark.usefixtures("local_ray")
def test_bad_ray_options_raise_config_error_before_anything_runs() -> None:
    ds = ray.data.from_items([{"prompt": "x"}])
    for kwargs in (
        {"actors": 0},
        {"actors": (3, 2)},
        {"actors": (1, 2, 3)},
        {"calls_per_actor": 0},
        {"batch_size": 0},
        {"num_cpus": -1},
        {"max_concurrency": 0},
        {"model_kwargs": {"prompt": "x"}},
    ):
        with pytest.raises(ConfigError):
            generate(ds, "http://127.0.0.1:9/", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stop": 5},
        {"stop": [""]},
        {"rate_limit": -1},
        {"rate_limit": "fast"},
        {"adaptive": "yes"},
    ],
)
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/", None])
@pytest.mark.usefixtures("local_ray")
def test_bad_map_options_raise_config_error_in_the_driver(
    kwargs: dict[str, Any], url: str | None
) -> None:
    """Review R19: these were checked only by each actor's first map(), so the job started
    and died with a RayTaskError wrapping the ConfigError; with the URL left to the actors'
    environment (None) the driver checked nothing at all."""
    ds = ray.data.from_items([{"prompt": "x"}])
    with pytest.raises(ConfigError):
        generate(ds, url, **kwargs)
    with pytest.raises(ConfigError):
        Generator("http://127.0.0.1:9/", **kwargs)


async def test_credentials_come_from_the_environment_and_stay_out_of_reprs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODAL_LLM_KEY", KEY)
    monkeypatch.setenv("MODAL_LLM_SECRET", SECRET)
    async with serve(ServerConfig(modal_key=KEY, modal_secret=SECRET)) as url:
        gen = Generator(url)
        out = await gen(_table(3))
        await gen.aclose()
    assert out.column("text").null_count == 0
    for text in (repr(gen), repr(gen.client), repr(gen.client.options), str(out.to_pylist())):
        assert SECRET not in text and KEY not in text


def test_close_from_another_thread_closes_the_client_on_its_loop() -> None:
    # As on a Ray actor: batches run on a loop in a thread of their own, and the actor's
    # shutdown drops the callable from another thread.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        async def run() -> Any:
            async with serve(ServerConfig()) as url:
                gen = Generator(url)
                out = await gen(_table(2))
                return gen, out

        gen, out = asyncio.run_coroutine_threadsafe(run(), loop).result(30)
        assert out.column("text").null_count == 0
        client = gen.client
        assert repr(client).endswith("opened>")
        del gen  # __del__ -> close() from this thread, on the client's loop
        assert repr(client).endswith("closed>")
        with pytest.raises(ClientClosedError):
            asyncio.run_coroutine_threadsafe(client.generate("x"), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- generate() on a local Ray -----------------------------------------------------------------


def _rows(ds: Any) -> list[dict[str, Any]]:
    return list(ds.iter_rows())


@pytest.mark.usefixtures("local_ray")
def test_thousands_of_rows_none_lost_none_doubled_and_retry_after_recovers() -> None:
    rows = 3000
    ds = ray.data.from_items([{"id": i, "prompt": f"p{i}"} for i in range(rows)])
    with endpoint_process(
        "--latency", "0.005", "--rate-limit-every", "6", "--retry-after", "0"
    ) as url:
        out = generate(ds, url, max_retries=10, model_kwargs={"max_tokens": 8}).materialize()
    assert out.schema().base_schema == pa.schema(
        [pa.field("id", pa.int64()), pa.field("prompt", pa.string()), *RESULT_SCHEMA]
    )
    got = _rows(out)
    ids = [r["id"] for r in got]
    assert len(ids) == rows and set(ids) == set(range(rows))
    assert all(r["text"] and r["error"] is None and r["status"] == 200 for r in got)
    retried = [r for r in got if r["attempts"] > 1]
    assert len(retried) >= rows // 10  # every 6th POST got 429 and was retried


@pytest.mark.usefixtures("local_ray")
def test_failed_rows_are_typed_and_the_output_reads_back_as_one_parquet_dataset(
    tmp_path: Path,
) -> None:
    rows, burst = 1000, 60
    ds = ray.data.from_items([{"id": i, "prompt": f"p{i}"} for i in range(rows)])
    target = tmp_path / "out"
    with endpoint_process("--error-burst", str(burst), "--error-status", "500") as url:
        generate(ds, url, max_retries=0).write_parquet(str(target))
    files = sorted(glob.glob(str(target / "*.parquet")))
    assert len(files) > 1
    schemas = {str(pq.read_schema(f).remove_metadata()) for f in files}
    assert len(schemas) == 1  # blocks with and without failures: one schema
    table = pq.read_table(target)  # one dataset, read in one go
    assert table.num_rows == rows
    assert sorted(table.column("id").to_pylist()) == list(range(rows))
    got = table.to_pylist()
    failed = [r for r in got if r["error"] is not None]
    assert len(failed) == burst
    for r in failed:
        assert r["text"] is None and r["error_type"] == "ServerError"
        assert r["status"] == 500 and r["attempts"] == 1 and "500" in r["error"]
    assert all(r["text"] and r["error_type"] is None for r in got if r["error"] is None)
    # The rerun recipe of docs/ray.md: the failed rows, fed back in, replace their results.
    with endpoint_process() as url:
        failed_again = ray.data.read_parquet(str(target)).filter(expr=col("error").is_not_null())
        rerun = generate(failed_again, url)
        again = _rows(rerun)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in failed)
    assert all(r["text"] and r["error"] is None for r in again)


class _PeerRecorder:
    """A contract endpoint in a thread that records each request's client port.

    It holds every request until a second client port shows up (or ``wait`` seconds
    pass), so that one actor cannot race through all the blocks while another starts.
    """

    def __init__(self, wait: float = 20.0) -> None:
        self.peers: set[int] = set()
        self.requests = 0
        self.wait = wait
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.peers.add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        self.requests += 1
        if len(self.peers) >= 2:
            self._both.set()
        try:
            await asyncio.wait_for(self._both.wait(), self.wait)
        except asyncio.TimeoutError:
            self._both.set()  # give up waiting: the test's assertion will say why
        return web.json_response({"prompt": body["prompt"].upper()})

    def __enter__(self) -> str:
        self._thread.start()
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)

        async def start() -> str:
            self._both = asyncio.Event()
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return f"http://127.0.0.1:{self._runner.addresses[0][1]}/"

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.mark.usefixtures("local_ray")
def test_a_one_block_input_is_spread_over_the_actors() -> None:
    rows = 200
    ds = ray.data.from_items([{"prompt": f"p{i}"} for i in range(rows)], override_num_blocks=1)
    recorder = _PeerRecorder()
    # One connection per actor (max_concurrency=1), so distinct client ports count the
    # actors at work; one call per actor, so the first actor cannot queue every block.
    with recorder as url:
        out = generate(ds, url, actors=2, calls_per_actor=1, batch_size=20, max_concurrency=1)
        got = _rows(out)
    assert len(got) == rows and all(r["text"] for r in got)
    assert recorder.requests == rows
    assert len(recorder.peers) == 2


@pytest.mark.usefixtures("local_ray")
def test_credentials_through_runtime_env_never_reach_a_column_or_a_log() -> None:
    ds = ray.data.from_items([{"id": i, "prompt": f"p{i}"} for i in range(200)])
    # Debug logging on in the actors: their logs get every line modal-llm can write.
    env = {"env_vars": {"MODAL_LLM_KEY": KEY, "MODAL_LLM_SECRET": SECRET, "MODAL_LLM_LOG": "debug"}}
    with endpoint_process("--modal-key", KEY, "--modal-secret", SECRET) as url:
        ok = _rows(generate(ds, url, runtime_env=env))
        refused = _rows(generate(ds.limit(20), url, max_retries=0))
    assert len(ok) == 200 and all(r["text"] and r["error"] is None for r in ok)
    # Without the environment the endpoint refuses the rows: typed, and still no secret.
    assert len(refused) == 20
    assert {(r["error_type"], r["status"]) for r in refused} == {("AuthenticationError", 401)}
    dumped = json.dumps([*ok, *refused], default=str)
    assert SECRET not in dumped and KEY not in dumped
    # The actors' own logs (what modal-llm and the actor processes print). Ray's
    # runtime_env agent logs env_vars itself: docs/ray.md says so and offers the way round.
    # The actors close their clients when Ray shuts them down, after the run: another
    # process writes that line, so there is no event to await, only the file to read.
    deadline = time.monotonic() + 30
    while not _worker_logs_with(b"closed the client for") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_logs_with(b"closed the client for")
    assert _worker_logs_with(SECRET.encode()) == []


def _worker_logs_with(text: bytes) -> list[str]:
    """The actors' own log files (not Ray's daemons') that contain ``text``."""
    return [
        path.name
        for path in (Path(_session_dir()) / "logs").iterdir()
        if path.name.startswith(("worker-", "python-core-worker-"))
        and path.is_file()
        and text in path.read_bytes()
    ]


def _session_dir() -> str:
    from ray._private.worker import global_worker

    return str(global_worker.node.get_session_dir_path())


@pytest.mark.usefixtures("local_ray")
def test_raise_on_error_fails_the_job_with_the_rows_error() -> None:
    # The last Ray test: a failed run's actors live on while anything (a log record's
    # traceback, here pytest's log capture) holds the failed executor.
    gc.collect()
    ds = ray.data.from_items([{"id": i, "prompt": f"p{i}"} for i in range(100)])
    with (
        endpoint_process("--error-burst", "1", "--error-status", "500") as url,
        pytest.raises(Exception, match="ServerError") as info,
    ):
        generate(ds, url, raise_on_error=True, max_retries=0).materialize()
    assert "500" in str(info.value)


@pytest.mark.usefixtures("local_ray")
def test_cli_batch_on_ray_writes_what_the_single_process_writes(tmp_path: Path) -> None:
    from modal_llm.cli import main

    rows, burst = 300, 30
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"p{i}", "n": i}) + "\n" for i in range(rows))
    )
    outputs = {}
    for mode in ("single", "ray"):
        out = tmp_path / f"{mode}.parquet"
        with endpoint_process("--error-burst", str(burst), "--error-status", "500") as url:
            argv = ["batch", str(source), "-o", str(out), "--endpoint", url, "--max-retries", "0"]
            status = main([*argv, "--ray"] if mode == "ray" else argv)
        assert status == 1  # some rows failed, either way
        outputs[mode] = pq.read_table(out)
    single, on_ray = outputs["single"], outputs["ray"]
    assert on_ray.schema == single.schema
    assert sorted(on_ray.column("id").to_pylist()) == sorted(single.column("id").to_pylist())
    for table in (single, on_ray):
        errors = [e for e in table.column("error").to_pylist() if e is not None]
        assert len(errors) == burst
        assert {(e["type"], e["status"]) for e in errors} == {("ServerError", 500)}
        assert table.column("text").null_count == burst


def test_a_generator_refuses_a_second_event_loop() -> None:
    async def one_batch(gen: Generator) -> Any:
        return await gen(_table(0).cast(_table(1).schema))

    gen = Generator("http://127.0.0.1:9/")
    asyncio.run(one_batch(gen))  # an empty batch sends nothing
    with pytest.raises(ClientClosedError, match="one event loop"):
        asyncio.run(one_batch(gen))


async def test_make_client_options_builds_unpicklable_options_in_the_actor() -> None:
    # Telemetry providers cannot be pickled to actors: each actor builds its own.
    trace = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    provider = trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    async with serve(ServerConfig()) as url:
        gen = Generator(url, make_client_options=lambda: {"tracer_provider": provider})
        out = await gen(_table(3))
        await gen.aclose()
    assert out.column("text").null_count == 0
    assert len(exporter.get_finished_spans()) == 3
    with pytest.raises(ConfigError, match="runtime_env"):
        Generator(url, make_client_options=lambda: {"modal_key": KEY, "modal_secret": SECRET})
