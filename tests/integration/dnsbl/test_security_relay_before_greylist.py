"""Security: the shipped edge relay's RCPT chain refuses relay attempts before greylisting.

The RCPT plugins run in the order of ``policies/edge-relay.toml`` (read from the file, so a
reordering there is tested here), with a DNS list that lists 127.0.0.1 and greylisting
in a SQLite file the test reads. 127.0.0.1 is listed at ``bl.test``, 127.0.0.2 is not
(see ``conftest.py``).
"""

from __future__ import annotations

import sqlite3
import time
import tomllib
from pathlib import Path

from gateway.testing import RunningGateway
from plugins.rcpt_greylist import REPLY_GREYLISTED
from plugins.rcpt_relay import REPLY_DENIED
from tests.conftest import MESSAGE
from tests.integration.dnsbl.conftest import REFUSED, SENT, SPECS, client, policy, split, zone

EDGE_RELAY = Path(__file__).resolve().parents[3] / "policies" / "edge-relay.toml"
RCPT_CHAIN = ("rcpt_relay", "connect_dnsbl", "rcpt_greylist", "rcpt_local_users")
RELAY_DOMAIN = "relayed.example"
DELAY = 1.0
LISTED, CLEAN = "127.0.0.1", "127.0.0.2"
DENIED = (REPLY_DENIED.code, REPLY_DENIED.status)
GREYLISTED = (REPLY_GREYLISTED.code, REPLY_GREYLISTED.status)


def shipped_chain(dns_port: int, store: Path) -> str:
    """The RCPT plugins of edge-relay.toml in its order, with their chain keys
    (``id``, ``refuse_only``) and test settings for the DNS list and greylisting."""
    test_settings = {
        "connect_dnsbl": zone("bl.test"),
        "rcpt_greylist": f'state = "sqlite://{store}"\ndelay = "{DELAY}s"\n',
    }
    entries = []
    for entry in tomllib.loads(EDGE_RELAY.read_text())["plugins"]:
        if entry["name"] not in RCPT_CHAIN:
            continue
        lines = [f'name = "{entry["name"]}"']
        lines += [f"{key} = {str(entry[key]).lower()}" for key in ("refuse_only",) if key in entry]
        lines += [f'id = "{entry["id"]}"'] if "id" in entry else []
        entries.append("\n".join(lines) + "\n" + test_settings.get(entry["name"], ""))
    return "".join(f"\n[[plugins]]\n{entry}" for entry in entries)


def edge_gateway(gateway_factory, dns, tmp_path: Path, relay: str = "") -> RunningGateway:
    """A gateway whose plugins are ``shipped_chain`` (the dnsbl helper's chain replaced)."""
    extra = f'[relay]\ndomains = [".{RELAY_DOMAIN}"]\n{relay}'
    text = policy(dns.port, "", extra=extra)
    text = text[: text.index("[[plugins]]")] + shipped_chain(dns.port, tmp_path / "grey.db")
    return gateway_factory(text, specs=SPECS)


def greylist_entries(store: Path) -> int:
    """Triplets the greylisting store holds (pending or passed)."""
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        return db.execute("SELECT count(*) FROM state WHERE key LIKE 'grey:%'").fetchone()[0]


def test_relay_attempt_is_refused_at_first_contact_and_leaves_no_greylist_entry(
    gateway_factory, dns, tmp_path: Path
) -> None:
    gw = edge_gateway(gateway_factory, dns, tmp_path)
    store = tmp_path / "grey.db"
    for source in (CLEAN, LISTED):  # refused as a relay attempt, whatever the DNS list says
        with client(gw.port, source) as c:
            assert c.mail("a@example.org")[0] == SENT
            status, text = split(c.rcpt("victim@elsewhere.example"))
            assert status == DENIED == REFUSED and text == REPLY_DENIED.text
            assert split(c.rcpt("victim%elsewhere.example@local.example"))[0] == REFUSED
    assert greylist_entries(store) == 0
    # The same client to one of our recipients is greylisted: the store is the one in use.
    with client(gw.port, CLEAN) as c:
        c.mail("a@example.org")
        assert split(c.rcpt("alice@local.example"))[0] == GREYLISTED
        assert split(c.rcpt(f"bob@{RELAY_DOMAIN}"))[0] == GREYLISTED
    assert greylist_entries(store) == 2
    assert gw.queue_ids() == []


def test_postmaster_and_abuse_of_our_domains_pass_greylisting_and_the_dns_list(
    gateway_factory, dns, tmp_path: Path
) -> None:
    gw = edge_gateway(gateway_factory, dns, tmp_path)
    ours = [
        "postmaster@local.example", f"postmaster@{RELAY_DOMAIN}",
        f"abuse@sub.{RELAY_DOMAIN}", "Postmaster@localhost", "<postmaster>",
    ]
    with client(gw.port, LISTED) as c:
        assert c.mail("a@example.org")[0] == SENT
        assert split(c.rcpt("alice@local.example"))[0] == REFUSED  # listed at bl.test
        assert split(c.rcpt(f"bob@{RELAY_DOMAIN}"))[0] == REFUSED
        for rcpt in ours:
            assert c.rcpt(rcpt)[0] == SENT, rcpt
        assert c.data(MESSAGE)[0] == SENT
    (qid,) = gw.queue_ids()
    assert len(gw.queue.load(qid).envelope.recipients) == len(ours)
    assert greylist_entries(tmp_path / "grey.db") == 0


def test_relay_domain_is_accepted_only_after_greylisting(gateway_factory, dns, tmp_path: Path) -> None:
    gw = edge_gateway(gateway_factory, dns, tmp_path)

    def attempt() -> tuple[int, str]:
        with client(gw.port, CLEAN) as c:
            c.mail("a@example.org")
            return split(c.rcpt(f"bob@{RELAY_DOMAIN}"))[0]

    assert attempt() == GREYLISTED
    time.sleep(DELAY + 0.2)
    assert attempt()[0] == SENT


def test_relay_client_may_relay_through_the_two_entries(gateway_factory, dns, tmp_path: Path) -> None:
    gw = edge_gateway(gateway_factory, dns, tmp_path, relay=f'clients = ["{LISTED}"]\n')
    with client(gw.port, LISTED) as c:  # a relay client: neither listed nor greylisted
        assert c.mail("a@example.org")[0] == SENT
        assert c.rcpt("someone@elsewhere.example")[0] == SENT
        assert c.rcpt(f"bob@{RELAY_DOMAIN}")[0] == SENT
        assert c.rcpt("alice@local.example")[0] == SENT
        assert c.rcpt("nobody@local.example")[0] == 550  # still a mailbox check
    with client(gw.port, CLEAN) as c:
        c.mail("a@example.org")
        assert split(c.rcpt("someone@elsewhere.example"))[0] == DENIED
    assert greylist_entries(tmp_path / "grey.db") == 0
