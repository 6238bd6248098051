"""Several gateway nodes, one console: the index in a real PostgreSQL server (issue #20,
item 8). Two gateway processes, each its own node (hostname, queue and var directories),
write their index to one database ([console] index_url); either node's console finds the
mail of both in tracking, counts both in statistics, and each story names its node."""

from __future__ import annotations

import multiprocessing
import re
import smtplib
import time
import types
from pathlib import Path
from typing import Any

from gateway.passwords import hash_password
from gateway.tracking.postgres import PostgresIndex
from gateway.tracking.story import Assembler
from gateway.tracking.events import Event
from tests.conftest import wait_for
from tests.integration.console.conftest import ADMIN, PASSWORD, PlainClient
from tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.processes import free_port, start_gateway, stop_gateway, write_policy

NODES = ("node-a.test.example", "node-b.test.example")


def _node(tmp_path: Path, name: str, url: str) -> tuple[Path, int, int]:
    """A node's policy: its own directories and hostname, the console on, the shared index."""
    workdir = tmp_path / name.split(".")[0]
    workdir.mkdir()
    (workdir / "admins").write_text(f"{ADMIN}:{hash_password(PASSWORD)}\n")
    port, console = free_port(), free_port()
    policy = write_policy(workdir, port, extra=f"""
[delivery]
poll_interval = "200ms"
[console]
enabled = true
port = {console}
admins_file = "{workdir / 'admins'}"
index_url = "{url}"
""")
    policy.write_text(policy.read_text().replace('hostname = "gw.test.example"', f'hostname = "{name}"'))
    return policy, port, console


def _send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("sender@example.org", ["alice@localhost"],
                        f"Subject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\nhello\r\n".encode())


def _client(console_port: int) -> PlainClient:
    client = PlainClient(types.SimpleNamespace(app=types.SimpleNamespace(console=types.SimpleNamespace(port=console_port))))  # type: ignore[arg-type]
    client.log_in()
    return client


def _figure(page: str, chart: str, series: str) -> str:
    table = page[page.index(f'id="{chart}-table"'):]
    found = re.search(rf'<tr data-series="{series}"><td>[^<]*</td><td class="num">([^<]*)</td>', table)
    assert found, series
    return found.group(1)


def test_two_nodes_write_one_postgresql_index_and_either_console_shows_both(tmp_path: Path, postgres_url: str) -> None:
    procs: list[Any] = []
    nodes = [_node(tmp_path, name, postgres_url) for name in NODES]
    try:
        for policy, port, _ in nodes:
            log = open(policy.parent / "gateway.log", "w")
            procs.append(start_gateway(policy, port, stderr=log))
        for n in range(3):
            _send(nodes[0][1], f"a{n}")
        for n in range(2):
            _send(nodes[1][1], f"b{n}")
        index = PostgresIndex(postgres_url)

        def all_delivered() -> bool:
            rows, total = index.search(limit=10)
            return total == 5 and all(r["state"] == "delivered" for r in rows)

        assert wait_for(all_delivered, 30), index.search(limit=10)
        rows, _ = index.search(limit=10)
        by_node = {node: sorted(r["message_id"] for r in rows if r["node"] == node) for node in NODES}
        assert by_node == {NODES[0]: [f"<a{n}@example.org>" for n in range(3)],
                           NODES[1]: [f"<b{n}@example.org>" for n in range(2)]}

        client = _client(nodes[1][2])  # node B's console
        status, _, page = client.request("/tracking?range=1h")
        assert status == 200
        shown = dict(re.findall(r'<tr data-key="([^"]+)" data-state="delivered" data-node="([^"]+)">', page))
        assert sorted(shown.values()) == sorted([NODES[0]] * 3 + [NODES[1]] * 2)
        status, _, page = client.request("/tracking?message_id=a1%40example.org&range=1h")
        (key,) = re.findall(r'<tr data-key="([^"]+)"', page)
        status, _, story = client.request(f"/tracking/{key}")
        assert status == 200 and f'<dd id="node">{NODES[0]}</dd>' in story
        steps = re.findall(r'<tr data-kind="([^"]+)"[^>]* data-node="([^"]+)">', story)
        kinds = [kind for kind, _ in steps]
        assert kinds[0] == "connect" and "queued" in kinds and "delivery" in kinds and kinds[-1] in ("removed", "at_once", "disconnect")
        assert {node for _, node in steps} == {NODES[0]}
        # Node A's session ids come from its own process ids: in the index they carry its name.
        assert re.search(rf"<dt>Session</dt><dd>S\d+-\d+@{re.escape(NODES[0])}</dd>", story)

        status, _, page = client.request("/statistics?range=1h")
        assert status == 200
        assert _figure(page, "chart-traffic", "received") == "5"
        assert _figure(page, "chart-traffic", "delivered") == "5"
    finally:
        for proc in procs:
            assert stop_gateway(proc) == 0


def _write_many(url: str, worker: int, messages: int) -> None:
    index = PostgresIndex(url)
    index.node = f"node{worker}"
    assembler = Assembler(f"@node{worker}")
    t = time.time()
    for n in range(messages):
        sid, qid = f"S1-{n:x}", f"W{worker}Q{n}"  # the nodes name their sessions alike
        index.write(assembler.feed([
            Event("connect", t, sid, "-", ("192.0.2.7", 4000, "smtp", False)),
            Event("mail", t, sid, "-", ("a@example.org", None)),
            Event("rcpt_ok", t, sid, "-", ("b@example.net", "rcpt_relay")),
            Event("queued", t, sid, qid, ("a@example.org", "<b@example.net>", 1, 300, "msg", 0.0)),
            Event("disconnect", t, sid, "-", ("192.0.2.7", 1)),
        ]))
    index.close()


def test_several_writers_share_the_database_without_loss_or_deadlock(postgres_url: str) -> None:
    index = PostgresIndex(postgres_url)
    index.create()
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_many, args=(postgres_url, w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows, total = index.search(limit=500)
    assert total == 400
    minute = int(time.time()) // 3600 * 3600 - 3600
    received = index.series(["received"], minute, time.time() + 60, 3600)["received"]["msg"]
    assert sum(received) == 400
    story = index.message("W2Q7")
    assert story is not None and story["node"] == "node2" and story["session"] == "S1-7@node2"
    assert [s["kind"] for s in story["story"]] == ["connect", "mail", "rcpt", "queued", "disconnect"]
    index.prune(time.time() + 1)
    assert index.search()[1] == 0
