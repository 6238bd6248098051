"""Shared helpers for the ``gateway`` sub-commands."""

from __future__ import annotations

from typing import Any

__all__ = ["check_aliases", "load"]


def load(policy_path: str | None) -> tuple[Any, Any]:
    """The policy (the embedded default when ``None``) and the plugin specs.

    :raises gateway.policy.PolicyError: the policy is invalid (file, line and key)
    """
    from gateway.app import registry
    from gateway.hooks import discover_plugins
    from gateway.policy import load_policy

    specs = discover_plugins()
    return load_policy(policy_path, registry=registry(specs)), specs


def check_aliases(policy: Any) -> tuple[str | None, list[str]]:
    """Check the policy's aliases file as the gateway does at start-up.

    :returns: ``(error, warnings)``: the error (``file:line: alias 'x': what``) or
        ``None``, and the start-up warnings (required names going nowhere)
    """
    from gateway.delivery.local.aliases import AliasError
    from gateway.delivery.local.expand import startup_check

    try:
        return None, startup_check(policy.local)
    except AliasError as exc:
        return str(exc), []
