"""The Maildir file names a real delivery writes are the ones docs/local-delivery.md shows:
``<arrival>.Q<queue id>R<recipient>L<line>.<host>``, through SMTP, the queue and the
scheduler into real Maildirs."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.conftest import MESSAGE, smtp, wait_for
from tests.localmail import LOCAL_POLICY

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = "`<arrival>.Q<queue id>R<recipient>L<line>.<host>`"
NAME = re.compile(r"^(?P<arrival>\d+)\.Q(?P<qid>[0-9A-F]{23})R(?P<rcpt>\d+)L(?P<line>\d+)\.(?P<host>.+)$")

POLICY = LOCAL_POLICY


def names(directory: Path) -> list[str]:
    new = directory / "new"
    return sorted(p.name for p in new.iterdir()) if new.is_dir() else []


def test_maildir_file_names_are_the_documented_ones(gateway_factory) -> None:
    assert DOCUMENTED in (ROOT / "docs" / "local-delivery.md").read_text()
    gw = gateway_factory(POLICY)
    mail_root = Path(gw.policy.local.mail_root)
    # bob's .qmail has two delivery lines: the second one's copy is line 1.
    (mail_root / "bob").mkdir(parents=True)
    (mail_root / "bob" / ".qmail").write_text("./Maildir/\n./Other/\n")
    (mail_root / "bob" / ".qmail").chmod(0o644)
    before = int(time.time())
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail("sender@example.org")
        client.rcpt("alice@localhost")
        client.rcpt("bob@localhost")
        code, reply = client.data(MESSAGE)
    after = int(time.time())
    assert code == 250
    qid = reply.decode().rsplit(" ", 1)[1]
    boxes = {
        "alice": mail_root / "alice" / "Maildir",
        "bob": mail_root / "bob" / "Maildir",
        "bob other": mail_root / "bob" / "Other",
    }
    assert wait_for(lambda: all(len(names(box)) == 1 for box in boxes.values()), timeout=15)
    found = {}
    for who, box in boxes.items():
        (name,) = names(box)
        match = NAME.match(name)
        assert match, name
        assert before <= int(match["arrival"]) <= after
        assert (match["qid"], match["host"]) == (qid, "mx.test.example")
        found[who] = (int(match["rcpt"]), int(match["line"]))
    assert found == {"alice": (0, 0), "bob": (1, 0), "bob other": (1, 1)}
