"""A tiny contract endpoint for latency-bound runs and streams, used when the reference one is not.

``POST /`` with ``{"prompt": p}`` sleeps ``--latency`` seconds and answers
``{"prompt": p + " ..."}`` (the reply contains the prompt: langchain_community's ``Modal``
fails without that). With ``"stream": true`` it answers Server-Sent Events: ``--pieces``
events ``data: {"prompt": "..."}`` spaced by ``--piece-delay`` seconds, then ``data: [DONE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

REPLY_SUFFIX = " -> a fixed completion from the benchmark latency server."


def make_app(latency: float, pieces: int, piece_delay: float) -> web.Application:
    """Build the application; all settings are closed over, nothing is computed per request."""
    events = [b'data: {"prompt": "tok%d "}\n\n' % i for i in range(pieces)]
    done = b"data: [DONE]\n\n"

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
            prompt = body["prompt"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"detail": "expected a JSON body with a prompt"}, status=422)
        if body.get("stream"):
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            if latency:
                await asyncio.sleep(latency)
            for event in events:
                await resp.write(event)
                if piece_delay:
                    await asyncio.sleep(piece_delay)
            await resp.write(done)
            await resp.write_eof()
            return resp
        if latency:
            await asyncio.sleep(latency)
        return web.Response(
            body=json.dumps({"prompt": str(prompt) + REPLY_SUFFIX}).encode(),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_post("/", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--pieces", type=int, default=200)
    parser.add_argument("--piece-delay", type=float, default=0.0)
    args = parser.parse_args()
    app = make_app(args.latency, args.pieces, args.piece_delay)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
