"""The stock plugins shipped with the gateway.

Each module is named ``<phase>_<what>`` and is referred to by that name in a policy's
``[[plugins]]`` chain. Third-party plugins register under the ``gateway.plugins``
entry point group and are first-class citizens alongside these.
"""

__all__ = ["DEFAULT_PLUGINS"]

#: Every stock plugin module, in registration order.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "auth_users_file",
    "connect_dnsbl",
    "connect_earlytalker",
    "connect_limits",
    "data_clamav",
    "data_dkim_verify",
    "data_dmarc",
    "data_rspamd",
    "data_spamd",
    "helo_checks",
    "mail_spf",
    "mail_rate_limit",
    "rcpt_greylist",
    "rcpt_relay",
    "rcpt_quota",
    "rcpt_local_users",
    "queue_authentication_results",
    "queue_dkim_sign",
    "queue_received_header",
)
