"""The docs promise what the package does: install lines that work without a PyPI release
(issue 12, item 12) and the exit statuses of docs/cli.md."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from modal_llm.cli import EXIT_CODES, build_parser
from modal_llm.server import build_parser as server_parser

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


# -- every documented command line parses ------------------------------------------------------

ANSI_C_QUOTED = re.compile(r"\$'((?:[^'\\]|\\.)*)'")


def documented_command_lines() -> list[tuple[str, list[str]]]:
    """``modal-llm`` command lines in the code blocks of README.md and docs/*.md, as argv.

    A line's ``$ `` prompt, trailing ``# comment`` and anything before a pipe go; bash's
    ``$'...'`` quoting is decoded the way bash does (``$'\\n\\n'`` is two newlines).
    Lines that are output (``modal-llm serve: error: ...``) are not commands.
    """
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        in_block = False
        for number, line in enumerate(page.read_text("utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            command = line.split("|")[-1].strip().removeprefix("$ ")
            if not in_block or not command.startswith("modal-llm "):
                continue
            command = ANSI_C_QUOTED.sub(
                lambda m: shlex.quote(m.group(1).encode().decode("unicode_escape")), command
            )
            argv = shlex.split(command, comments=True)[1:]
            if argv and not argv[0].endswith(":"):
                found.append((f"{page.relative_to(ROOT)}:{number}", argv))
    return found


DOCUMENTED = documented_command_lines()


def test_the_docs_show_command_lines() -> None:
    assert {argv[0] for _, argv in DOCUMENTED} == {"demo", "generate", "batch", "serve"}
    assert ["generate", "Tell me a story", "--stream", "--stop", "\n\n"] in [
        argv for _, argv in DOCUMENTED
    ]


@pytest.mark.parametrize(("where", "argv"), DOCUMENTED, ids=[where for where, _ in DOCUMENTED])
def test_every_documented_command_line_parses(where: str, argv: list[str]) -> None:
    """What the docs tell a user to type is accepted by the parser (review R10: docs/cli.md's
    own ``--stop $'\\n\\n'`` was refused). Parsing only: nothing is sent or served."""
    if argv[0] == "serve":
        server_parser(add_help=True).parse_args(argv[1:])
    else:
        build_parser().parse_args(argv)
