"""``modal-llm generate PROMPT``: send one prompt and print the answer."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import EXIT_OK, make_client

__all__ = ["add_parser", "generate"]


def add_parser(commands: Any, endpoint: argparse.ArgumentParser) -> None:
    """Register ``generate`` on the ``commands`` subparsers."""
    gen = commands.add_parser(
        "generate",
        parents=[endpoint],
        help="send one prompt and print the answer",
        description="Send PROMPT to the endpoint and print the generated text.",
    )
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--stream", action="store_true", help="print the answer as it arrives")


async def generate(args: argparse.Namespace) -> int:
    """Run ``generate``; return the exit status (errors propagate to ``main``)."""
    params = dict(args.param)
    out = sys.stdout
    async with make_client(args) as client:
        if not args.stream:
            text = await client.generate(args.prompt, stop=args.stop, **params)
            out.write(text + "\n")
            out.flush()
            return EXIT_OK
        last = ""
        async for piece in client.stream(args.prompt, stop=args.stop, **params):
            out.write(piece)
            out.flush()
            last = piece
        if not last.endswith("\n"):
            out.write("\n")
        out.flush()
    return EXIT_OK
