"""The docs promise what the package does: install lines that work without a PyPI release
(issue 12, item 12) and the exit statuses of docs/cli.md."""

from __future__ import annotations

import re
from pathlib import Path

from modal_llm.cli import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *(ROOT / "docs").rglob("*.py")]
# modal-llm as a requirement that pip resolves from an index, which has no such package.
MODAL_LLM = re.compile(r"modal-llm(\[[^\]]*\])?")


def asks_an_index_for_modal_llm(line: str) -> bool:
    """Whether a ``pip install`` command in ``line`` names modal-llm as a package to fetch."""
    for command in re.split(r"&&|;|\||#", line):
        _, found, args = command.partition("pip install ")
        if found and any(MODAL_LLM.fullmatch(word.strip("'\"`(),.")) for word in args.split()):
            return True
    return False


def test_no_install_line_asks_an_index_for_modal_llm() -> None:
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text("utf-8").splitlines(), 1):
            if asks_an_index_for_modal_llm(line):
                found.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_rule_catches_the_old_lines() -> None:
    bad = [
        "pip install modal-llm",
        "pip install 'modal-llm[langchain]'",
        'pip install "modal-llm[progress]"  # bars',
        "tracing (`pip install 'modal-llm[otel]'`), and more",
    ]
    good = [
        'pip install -e ".[langchain]"',
        'pip install "/path/to/modal-llm[langchain]"',
        "pip install tqdm",
        'pip install -e ".[progress]" && modal-llm demo',
    ]
    assert all(asks_an_index_for_modal_llm(line) for line in bad)
    assert not any(asks_an_index_for_modal_llm(line) for line in good)


def test_cli_md_lists_every_exit_status() -> None:
    text = (ROOT / "docs" / "cli.md").read_text("utf-8")
    table = text[text.index("## Exit statuses") :]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == set(EXIT_CODES)
