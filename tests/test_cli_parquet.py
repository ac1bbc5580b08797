"""``modal-llm batch`` with Parquet INPUT and OUTPUT (pyarrow, the ``parquet`` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modal_llm.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from modal_llm.server import STATS, ServerConfig, create_app, serve, toy_generate
from tests.cli_support import MODAL_LLM, cli_env, modal_llm

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def read(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


async def test_parquet_in_parquet_out_with_the_jsonl_columns(tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "prompt": ["first", "second", None, "fourth"],
            "temperature": [0.1, None, 0.3, None],
        }
    )
    pq.write_table(table, source)
    output = tmp_path / "out.parquet"
    app = create_app(ServerConfig())
    async with serve(app) as url:
        ran = await modal_llm("batch", str(source), "-o", str(output), "--endpoint", url)
    assert ran.code == EXIT_BAD_INPUT, ran.err
    assert f"{source}: row 3: bad input row: 'prompt' is missing" in ran.err
    assert "1 bad input rows skipped" in ran.err
    result = pq.read_table(output)
    assert result.schema.names == ["id", "text", "error", "attempts", "latency"]
    assert str(result.schema.field("id").type) == "string"
    rows = {r["id"]: r for r in result.to_pylist()}
    assert set(rows) == {"a", "b", "d"}
    assert rows["a"]["text"] == toy_generate("first") and rows["a"]["error"] is None
    assert rows["a"]["attempts"] == 1 and rows["a"]["latency"] >= 0
    bodies = {b["prompt"]: b for b in app[STATS].bodies}
    assert bodies["first"] == {"prompt": "first", "temperature": 0.1}  # a null is not sent
    assert bodies["second"] == {"prompt": "second"}
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()


async def test_jsonl_to_parquet_resumes_and_keeps_one_row_per_id(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(f"prompt {i}\n" for i in range(6)), "utf-8")
    output = tmp_path / "out.parquet"
    app = create_app(ServerConfig(error_burst=2, error_status=500))
    async with serve(app) as url:
        args = ("batch", str(source), "-o", str(output), "--endpoint", url, "--max-retries", "0")
        ran = await modal_llm(*args, "--concurrency", "1")
        assert ran.code == EXIT_FAILED
        first = {r["id"]: r for r in read(output)}
        assert len(first) == 6
        failed = {i for i, r in first.items() if r["error"] is not None}
        assert len(failed) == 2
        assert all(first[i]["error"]["type"] == "ServerError" for i in failed)
        assert all(first[i]["error"]["status"] == 500 for i in failed)

        ran = await modal_llm(*args)
        assert ran.code == EXIT_OK, ran.err
        assert "4 already done" in ran.err
        assert len(app[STATS].bodies) == 8  # only the two failures were sent again
    rows = read(output)
    assert sorted(r["id"] for r in rows) == [1, 2, 3, 4, 5, 6]  # one row per id
    assert all(r["text"] == toy_generate(f"prompt {r['id'] - 1}") for r in rows)


async def test_a_crash_leaves_a_journal_that_the_rerun_merges(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"p{i}"}) + "\n" for i in range(4)), "utf-8"
    )
    output = tmp_path / "out.parquet"
    journal = tmp_path / "out.parquet.partial.jsonl"
    # What a killed run left: two results in the journal, the last line cut short.
    journal.write_text(
        '{"id": "q0", "text": "before", "attempts": 1, "latency": 0.1}\n'
        '{"id": "q1", "text": "before", "attempts": 1, "latency": 0.1}\n{"id": "q2", "te',
        "utf-8",
    )
    app = create_app(ServerConfig())
    async with serve(app) as url:
        ran = await modal_llm("batch", str(source), "-o", str(output), "--endpoint", url)
    assert ran.code == EXIT_OK, ran.err
    assert sorted(b["prompt"] for b in app[STATS].bodies) == ["p2", "p3"]
    rows = {r["id"]: r["text"] for r in read(output)}
    assert rows == {
        "q0": "before",
        "q1": "before",
        "q2": toy_generate("p2"),
        "q3": toy_generate("p3"),
    }
    assert not journal.exists()


async def test_ids_of_two_types_are_refused_for_parquet_output(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "x"}\n{"prompt": "no id: line number 2"}\n', "utf-8")
    ran = await modal_llm(
        "batch", str(source), "-o", str(tmp_path / "o.parquet"), "--endpoint", "http://127.0.0.1:9/"
    )
    assert ran.code == EXIT_USAGE
    ran.one_line_error("line 2 has an integer id", "line 1 a string one", "one type")


def test_without_pyarrow_one_line_names_the_extra(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    (blocker / "pyarrow").mkdir(parents=True)
    (blocker / "pyarrow" / "__init__.py").write_text("raise ImportError('blocked')\n", "utf-8")
    source = tmp_path / "in.txt"
    source.write_text("hi\n", "utf-8")
    for args in (
        [str(source), "-o", str(tmp_path / "out.parquet")],
        [str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out.jsonl")],
    ):
        proc = subprocess.run(
            [str(MODAL_LLM), "batch", *args, "--endpoint", "http://127.0.0.1:9/"],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(PYTHONPATH=str(blocker)),
        )
        assert proc.returncode == EXIT_USAGE
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert "Parquet needs pyarrow" in lines[0] and "'parquet' extra" in lines[0]


def test_import_modal_llm_never_loads_pyarrow() -> None:
    code = "import sys, modal_llm, modal_llm.cli; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
