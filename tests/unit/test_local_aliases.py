"""The aliases file parser and the recursive resolver (gateway.delivery.local.aliases)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.delivery.local.aliases import (
    AliasError,
    ExpansionError,
    Leaf,
    Resolver,
    Target,
    parse_aliases,
    read_target_file,
)
from gateway.delivery.local.expand import AliasTable, expand_recipient, startup_check
from gateway.policy.model import LocalSettings


def resolver(text: str, **kwargs: object) -> Resolver:
    return Resolver(parse_aliases(text, source="aliases"), domains=("example.com",), **kwargs)  # type: ignore[arg-type]


def test_every_target_syntax_with_continuations_comments_and_quotes() -> None:
    parsed = parse_aliases(
        "# header comment\n"
        "Staff: alice, bob@example.org,   # trailing comment\n"
        '\t"|/usr/bin/archive --tag a,b", /var/mail/staff,\n'
        "# a comment inside the entry\n"
        '  /srv/staff/, :include:/etc/staff.list, \\carol, "/path with space"\n'
        "\n"
        "other: dave\n",
        source="aliases",
    )
    staff = parsed.aliases["staff"]
    assert staff.line == 2
    assert staff.targets == (
        Target("address", "alice", 2),
        Target("address", "bob@example.org", 2),
        Target("program", "/usr/bin/archive --tag a,b", 3),
        Target("file", "/var/mail/staff", 3),
        Target("file", "/srv/staff/", 5),
        Target("include", "/etc/staff.list", 5),
        Target("user", "carol", 5),
        Target("file", "/path with space", 5),
    )
    assert parsed.aliases["other"].targets == (Target("address", "dave", 7),)


@pytest.mark.parametrize(
    "text, line, alias, message",
    [
        ("a: b\nb c d\n", 2, "", "expected 'name: target, ...'"),
        ("a: b\na: c\n", 2, "a", "defined twice (first at line 1)"),
        ("a:\n", 1, "a", "no targets"),
        ("a: b,\n  |\n", 2, "a", "empty program target"),
        ("a: b,\n  :include:\n", 2, "a", "empty :include: path"),
        ('a: "|x\n', 1, "a", "unterminated double quote"),
        ("a: b,\n  c@@example.org\n", 2, "a", "invalid address"),
        ("a: /one /two\n", 1, "a", "white space in target"),
        ("bad@name: b\n", 1, "bad@name", "invalid alias name"),
    ],
)
def test_errors_name_file_line_and_alias(text: str, line: int, alias: str, message: str) -> None:
    with pytest.raises(AliasError) as info:
        parse_aliases(text, source="/etc/gateway/aliases")
    assert info.value.file == "/etc/gateway/aliases"
    assert info.value.line == line
    assert info.value.alias == alias
    assert message in info.value.message
    assert str(info.value).startswith(f"/etc/gateway/aliases:{line}: ")


def test_nested_aliases_expand_recursively_without_duplicates() -> None:
    resolve = resolver("all: staff, sales, alice@example.com\nstaff: alice, bob\nsales: bob, x@example.org\n")
    assert resolve.expand("all") == [
        Leaf("user", "alice"), Leaf("user", "bob"), Leaf("address", "x@example.org"),
    ]


def test_an_alias_naming_itself_means_the_local_user() -> None:
    assert resolver("list: list, bob\n").expand("LIST") == [Leaf("user", "list"), Leaf("user", "bob")]


def test_backslash_name_is_never_expanded() -> None:
    assert resolver("a: \\b\nb: c\n").expand("a") == [Leaf("user", "b")]


@pytest.mark.parametrize(
    "text, chain",
    [
        ("a: b\nb: a\n", "a -> b -> a"),
        ("a: b\nb: c, d\nc: e\ne: b\n", "b -> c -> e -> b"),
        ("a: x, a@example.com, y\nb: z\n", None),  # a self reference, not a loop
    ],
)
def test_loops_are_an_error_naming_the_chain(text: str, chain: str | None) -> None:
    resolve = resolver(text)
    if chain is None:
        assert Leaf("user", "a") in resolve.expand("a")
        return
    with pytest.raises(ExpansionError) as info:
        resolve.expand("a")
    assert info.value.reply.code == 554 and info.value.reply.status == "5.4.6"
    assert chain in info.value.reply.text


def test_includes_are_read_relative_to_the_aliases_file(tmp_path: Path) -> None:
    (tmp_path / "team.list").write_text("# members\ncarol, dave\n\n|/bin/true\n")
    (tmp_path / "team.list").chmod(0o644)
    resolve = Resolver(parse_aliases("team: :include:team.list\n", source=str(tmp_path / "aliases")))
    assert resolve.expand("team") == [Leaf("user", "carol"), Leaf("user", "dave"), Leaf("program", "/bin/true")]


def test_include_loop_missing_and_unsafe_includes(tmp_path: Path) -> None:
    (tmp_path / "self.list").write_text(f":include:{tmp_path / 'self.list'}\n")
    (tmp_path / "self.list").chmod(0o644)
    (tmp_path / "open.list").write_text("carol\n")
    (tmp_path / "open.list").chmod(0o666)
    resolve = Resolver(parse_aliases(
        "loop: :include:self.list\nmissing: :include:nope.list\nopen: :include:open.list\n",
        source=str(tmp_path / "aliases"),
    ))
    with pytest.raises(ExpansionError) as info:
        resolve.expand("loop")
    assert info.value.reply.status == "5.4.6"
    with pytest.raises(ExpansionError) as info:
        resolve.expand("missing")
    assert info.value.reply.code == 451 and not info.value.is_permanent
    with pytest.raises(ExpansionError) as info:
        resolve.expand("open")
    assert info.value.reply.code == 451 and info.value.reply.status == "4.7.0"
    assert "writable by group or others" in info.value.detail


def test_forward_targets_belong_to_their_user() -> None:
    forwards = {"alice": (Target("user", "alice", 1), Target("program", "vacation", 2), Target("file", "/h/a/mbox", 3))}
    resolve = resolver("sales: alice\n", users=("alice",), forward=forwards.get)
    assert resolve.expand("sales") == [
        Leaf("user", "alice"), Leaf("program", "vacation", "alice"), Leaf("mbox", "/h/a/mbox", "alice"),
    ]


def test_unknown_names_are_listed_when_users_are_known() -> None:
    resolve = resolver("a: alice, alice-ext, mallory\n", users=("alice",))
    resolve.expand("a")
    assert resolve.unknown == {"mallory"}


def test_read_target_file_refuses_a_file_others_may_write(tmp_path: Path) -> None:
    path = tmp_path / ".forward"
    path.write_text("bob\n")
    path.chmod(0o620)
    with pytest.raises(AliasError, match="writable by group or others"):
        read_target_file(path)


def test_table_rereads_a_changed_file_and_keeps_the_last_good_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "aliases"
    path.write_text("a: b\n")
    table = AliasTable(path)
    assert set(table.load().aliases) == {"a"}
    monkeypatch.setattr("gateway.delivery.local.expand.RECHECK_SECONDS", 0.0)
    path.write_text("a: b\nc: d\n")
    assert set(table.current().aliases) == {"a", "c"}
    path.write_text("a: b\nbroken\n")
    assert set(table.current().aliases) == {"a", "c"}


def test_expand_recipient_leaves_ordinary_mailboxes_alone(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("sales: alice, bob\n")
    local = LocalSettings(domains=("example.com",), users=("alice", "bob"), aliases=tmp_path / "aliases")
    assert expand_recipient(local, "alice") is None
    assert expand_recipient(local, "Sales") == [Leaf("user", "alice"), Leaf("user", "bob")]


def test_startup_check_refuses_loops(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("abuse: alice\n")
    local = LocalSettings(domains=("example.com",), users=("postmaster", "alice"), aliases=path)
    assert startup_check(local) == []  # MAILER-DAEMON goes to the postmaster
    path.write_text("abuse: alice\nx: y\ny: x\n")
    with pytest.raises(AliasError) as info:
        startup_check(local)
    assert info.value.line == 2 and info.value.alias == "x"


def test_an_include_in_a_forward_file_must_stay_in_the_home(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    home.mkdir()
    (home / "lists").write_text("carol\n")
    (home / "lists").chmod(0o644)
    (tmp_path / "secret").write_text("dave\n")
    forwards = {
        "alice": (Target("include", "lists", 1),),
        "bob": (Target("include", str(tmp_path / "secret"), 1),),
    }
    resolve = resolver("", users=("alice", "bob"), forward=forwards.get, home=lambda user: tmp_path / user)
    assert resolve.expand("alice") == [Leaf("user", "carol")]
    with pytest.raises(ExpansionError) as info:
        resolve.expand("bob")
    assert info.value.reply.code == 554 and "outside the home" in info.value.reply.text
