"""The qmail converter on small control directories: each qmail form, what it becomes."""

from __future__ import annotations

from pathlib import Path

from gateway.app import registry
from gateway.delivery.router import route_for
from gateway.delivery.types import LocalRoute, MxRoute, SmarthostRoute
from gateway.hooks import discover_plugins
from gateway.migrate.qmail import Conversion, convert
from gateway.policy import Policy, load_policy_text


def qmail(tmp_path: Path, files: dict[str, str]) -> tuple[Conversion, Policy]:
    """Write a qmail root (control/me is mx.example.com unless given), convert and load it."""
    files = {"control/me": "mx.example.com\n", **files}
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    result = convert(tmp_path)
    policy = load_policy_text(result.policy, source="converted.toml", registry=registry(discover_plugins()))
    return result, policy


def warned(result: Conversion, text: str) -> bool:
    return any(text in warning for warning in result.warnings)


def test_locals_default_to_me_and_a_missing_rcpthosts_is_called_an_open_relay(tmp_path: Path) -> None:
    result, policy = qmail(tmp_path, {})
    assert policy.local.domains == ("mx.example.com",)
    assert policy.relay.domains == ()
    assert warned(result, "rcpthosts: missing: qmail-smtpd accepted every domain")


def test_exact_and_prefix_assign_lines_make_one_user(tmp_path: Path) -> None:
    result, policy = qmail(
        tmp_path,
        {
            "users/assign": "=Ann:ann:1001:1001:/home/ann:::\n+ann-:ann:1001:1001:/home/ann:-::\n"
            "=bob:bob:1002:1002:/home/bob:::\n.\n",
        },
    )
    assert [(a.user, str(a.home)) for a in policy.local.assign] == [("ann", "/home/ann"), ("bob", "/home/bob")]
    assert route_for("ann-news@mx.example.com", policy) == LocalRoute("ann", "news", "mx.example.com")
    # bob had no +bob- line: the one difference is reported.
    assert warned(result, "bob-EXT addresses are accepted here too")
    assert not warned(result, "ann-EXT")


def test_assign_forms_without_an_equivalent_are_kept_as_comments(tmp_path: Path) -> None:
    lines = [
        "=postmaster:alias:7790:2108:/var/qmail/alias:-:postmaster:",
        "+ann-:ann:1001:1001:/home/ann:-:lists-:",
        "+ann:ann:1001:1001:/home/ann:-::",
        "=carl:carl:1003:1003:/home/carl:::",
        "+carl-:carl:1004:1003:/home/carl:-::",
    ]
    result, policy = qmail(tmp_path, {"users/assign": "\n".join(lines) + "\n"})
    for line in lines[:3] + lines[4:]:
        assert f"#     {line}\n" in result.policy
    assert [a.user for a in policy.local.assign] == ["carl"]
    assert warned(result, "assign:5: not converted: conflicts with line 4")
    assert warned(result, "no '.' line at the end")


def test_virtualdomains_forms(tmp_path: Path) -> None:
    result, policy = qmail(
        tmp_path,
        {
            "control/locals": "mx.example.com\nexample.com\n",
            "control/virtualdomains": "example.com:joe\n:catchall\nann@example.org:ann\n"
            ".example.net:net\nexample.net:\nhosted.example:hosted\n",
            "control/rcpthosts": "mx.example.com\nexample.com\nhosted.example\n",
        },
    )
    assert dict(policy.local.virtual) == {"hosted.example": "hosted"}
    assert warned(result, "example.com is also in locals")
    for reason in ("a catch-all virtual domain", "single-address virtual users", "wildcard virtual domains", "an exception to a wildcard"):
        assert warned(result, reason)
    # No assign entry for the prefix: still accepted (qmail found it in the system
    # accounts), with a warning about where its mail goes now.
    assert "hosted" in policy.local.users
    assert route_for("sales@hosted.example", policy) == LocalRoute("hosted", "sales", "hosted.example")
    assert warned(result, "maps to 'hosted', which has no users/assign entry")


def test_smtproutes_forms(tmp_path: Path) -> None:
    result, policy = qmail(
        tmp_path,
        {
            "control/smtproutes": "example.org:relay1.example\nexample.org:relay2.example:26\n"
            ".example.com:[192.0.2.7]\n:\n",
        },
    )
    assert route_for("a@example.org", policy) == SmarthostRoute("relay2.example", 26, "opportunistic")
    assert warned(result, "the last line is used")
    assert route_for("a@b.example.com", policy) == SmarthostRoute("[192.0.2.7]", 25, "opportunistic")
    # qmail sent example.com itself (no default route) to its MX.
    assert route_for("a@example.com", policy) == MxRoute("example.com")
    assert route_for("a@other.example", policy) == MxRoute("other.example")


def test_numbers_and_names(tmp_path: Path) -> None:
    result, policy = qmail(
        tmp_path,
        {
            "control/timeoutconnect": "20\n",
            "control/timeoutremote": "900\n",
            "control/doublebounceto": "hostmaster\n",
            "control/defaultdelivery": "./Maildir/\n",
            "control/queuelifetime": "86400\nextra line\n",
            "control/databytes": "0\n",
        },
    )
    delivery = policy.delivery
    assert (delivery.connect_timeout, delivery.command_timeout, delivery.data_timeout) == (20, 900, 900)
    assert delivery.postmaster == "hostmaster@mx.example.com"
    assert delivery.queue_lifetime == 86400
    assert policy.local.mailbox == "maildir"
    assert warned(result, "queuelifetime:2: ignored: qmail reads only the first line")
    assert policy.limits.max_message_size == 25 * 1024**2
    assert warned(result, "databytes 0 (no limit)")


def test_a_certificate_and_unknown_files(tmp_path: Path) -> None:
    result, policy = qmail(
        tmp_path, {"control/servercert.pem": "not checked here\n", "control/spfbehavior": "3\n"}
    )
    assert policy.tls.cert == policy.tls.key == tmp_path / "control" / "servercert.pem"
    assert policy.tls.self_signed is False
    assert warned(result, "spfbehavior: not converted: not a stock qmail control file")
    assert "spfbehavior: not a stock qmail control file" in result.policy
