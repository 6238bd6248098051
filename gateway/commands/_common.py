"""Shared helpers for the ``gateway`` sub-commands."""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def load(policy_path: str | None) -> tuple[Any, Any]:
    """The policy (the embedded default when ``None``) and the plugin specs.

    :raises gateway.policy.PolicyError: the policy is invalid (file, line and key)
    """
    from gateway.app import registry
    from gateway.hooks import discover_plugins
    from gateway.policy import load_policy

    specs = discover_plugins()
    return load_policy(policy_path, registry=registry(specs)), specs
