"""/metrics scraped from a running gateway and parsed with prometheus-client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BASE_POLICY, MESSAGE, RawClient, smtp


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_sessions_messages_verdicts_and_queue(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + '\n[metrics]\nenabled = true\nport = 0\n')
    port = gw.app.metrics_server.server_address[1]
    with smtp(gw.port) as client:
        client.sendmail("a@example.org", ["alice@localhost"], MESSAGE)
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<x@elsewhere.example>")[0] == 550
    c.cmd("QUIT")
    c.close()
    metrics = scrape(port)
    assert value(metrics["gateway_sessions"], "gateway_sessions_total", listener="smtp") == 2
    assert value(metrics["gateway_messages_queued"], "gateway_messages_queued_total") == 1
    assert value(metrics["gateway_messages_queued_bytes"], "gateway_messages_queued_bytes_total") == len(MESSAGE)
    # Delivery is off here: queued, not delivered at once.
    assert value(metrics["gateway_messages_delivered_at_once"], "gateway_messages_delivered_at_once_total") == 0
    assert value(metrics["gateway_plugin_verdicts"], "gateway_plugin_verdicts_total",
                 plugin="rcpt_relay", hook="gateway_rcpt", action="reject") == 1
    assert value(metrics["gateway_refusals"], "gateway_refusals_total", stage="rcpt", action="reject") == 1
    histogram = metrics["gateway_hook_duration_seconds"]
    assert value(histogram, "gateway_hook_duration_seconds_count", plugin="rcpt_local_users", hook="gateway_rcpt") == 1
    assert value(metrics["gateway_queue_messages"], "gateway_queue_messages") == 1


def test_with_workers_the_endpoint_counts_every_process(tmp_path) -> None:
    """``workers = 2``: the master serves /metrics and adds the worker's counts, so the
    totals cover every session and delivery, whichever process had them."""
    from tests.conftest import wait_for
    from tests.processes import free_port, start_gateway, stop_gateway, write_policy

    port, metrics_port = free_port(), free_port()
    extra = f"[metrics]\nenabled = true\nport = {metrics_port}"
    policy = write_policy(tmp_path, port, workers=2, extra=extra, plugins=("rcpt_local_users",))
    proc = start_gateway(policy, port)
    try:
        def serving() -> bool:
            try:
                scrape(metrics_port)
                return True
            except OSError:
                return False

        assert wait_for(serving, timeout=20)
        for _ in range(30):  # one message per connection: the kernel spreads them
            with smtp(port) as client:
                client.sendmail("a@example.org", ["alice@localhost"], MESSAGE)

        def totals() -> tuple[float, float, float, float]:
            m = scrape(metrics_port)
            return (value(m["gateway_sessions"], "gateway_sessions_total"),
                    value(m["gateway_messages_queued"], "gateway_messages_queued_total"),
                    value(m["gateway_messages_delivered_at_once"], "gateway_messages_delivered_at_once_total"),
                    value(m["gateway_deliveries"], "gateway_deliveries_total", status="delivered"))

        # 31 sessions: the 30 messages and start_gateway's probe of the port. Each message
        # is one plain Maildir delivery: delivered at once, whichever process had it.
        assert wait_for(lambda: totals() == (31, 30, 30, 30), timeout=15), totals()
        new = tmp_path / "mail" / "alice" / "Maildir" / "new"
        assert len(list(new.iterdir())) == 30
        snapshots = list((tmp_path / "var" / "metrics").glob("worker-*.json"))
        assert len(snapshots) == 1, "the worker reports its counts"
    finally:
        assert stop_gateway(proc) == 0
    assert not list((tmp_path / "var" / "metrics").glob("worker-*.json")), "a stopped worker withdraws its counts"
