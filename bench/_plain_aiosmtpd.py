"""The reference server for bench/accept.py: aiosmtpd doing nothing.

One process, one event loop, aiosmtpd's stock SMTP protocol; the handler answers 250 to
DATA without looking at the message or touching the disk. This is the ceiling any
Python SMTP server built on aiosmtpd can hope for on this machine, so the gateway's
figures are reported as ratios to it.

    python bench/_plain_aiosmtpd.py --port 2600 [--loop asyncio|uvloop|auto]

Prints one line ``ready port=N loop=NAME pid=N`` on standard output once listening, and
exits cleanly on SIGTERM or SIGINT. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class Discard:
    """Accept everything, keep nothing."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


def _loop_name(choice: str) -> str:
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            sys.exit("_plain_aiosmtpd: uvloop is not importable")
        return "asyncio"
    return "uvloop"


async def serve(host: str, port: int, loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="plain.localhost", enable_SMTPUTF8=True),
        host=host,
        port=port,
        backlog=1024,  # the gateway's listener uses the same backlog
        reuse_address=True,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready port={bound} loop={loop_name} pid={os.getpid()}", flush=True)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("this benchmark server listens on loopback only")
    # aiosmtpd logs every session at INFO on "mail.log"; keep it quiet like the gateway.
    logging.basicConfig(level=logging.WARNING)
    name = _loop_name(args.loop)
    if name == "uvloop":
        import uvloop

        uvloop.run(serve(args.host, args.port, name))
    else:
        asyncio.run(serve(args.host, args.port, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
