"""Commit messages to a queue store in a loop until killed; run by test_queue_crash.py.

Usage: ``python _queue_writer.py ROOT [SEED]``. Opens the store (which recovers it),
prints ``READY``, then runs 20 concurrent committers. Each prints
``OK <qid> <sha256 of the message bytes>`` only after :meth:`QueueStore.commit` has
returned, then marks its first recipient delivered with :meth:`QueueStore.update_state`
and prints ``STATE <qid>`` once that has returned. Every line is one ``write(2)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.model import Envelope, Message, QueuedRecipient, RecipientState  # noqa: E402
from gateway.queue import QueueStore  # noqa: E402

CONCURRENCY = 20


def _say(line: str) -> None:
    os.write(1, line.encode("ascii") + b"\n")


def _random_message(rng: random.Random) -> Message:
    # Mostly small messages, some large enough that a kill often lands mid-write.
    size = rng.randint(0, 8_000) if rng.random() < 0.9 else rng.randint(100_000, 600_000)
    message = Message(b"Subject: crash test\r\n\r\n" + rng.randbytes(size))
    message.prepend_header("Received", f"from writer pid {os.getpid()}")
    return message


async def _committer(store: QueueStore, rng: random.Random) -> None:
    while True:
        envelope = Envelope(
            sender="crash@example.org",
            recipients=[QueuedRecipient(f"r{i}@example.net") for i in range(rng.randint(1, 3))],
        )
        message = _random_message(rng)
        qid = store.new_id()
        await store.commit(qid, envelope, message)
        _say(f"OK {qid} {hashlib.sha256(message.as_bytes()).hexdigest()}")
        envelope.recipients[0].state = RecipientState.DELIVERED
        await asyncio.to_thread(store.update_state, qid, envelope, attempts=1)
        _say(f"STATE {qid}")


async def _main(root: str, seed: int) -> None:
    store = QueueStore(root)
    store.open()
    _say("READY")
    rng = random.Random(seed)
    async with asyncio.TaskGroup() as group:
        for _ in range(CONCURRENCY):
            group.create_task(_committer(store, random.Random(rng.random())))


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
