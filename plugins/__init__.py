"""The stock plugins shipped with the gateway.

Each module is named ``<phase>_<what>`` and is referred to by that name in a policy's
``[[plugins]]`` chain. Third-party plugins register under the ``gateway.plugins``
entry point group and are first-class citizens alongside these.
"""

__all__ = ["DEFAULT_PLUGINS"]

#: Every stock plugin module, in registration order.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "auth_lockout",
    "auth_users_file",
    "auth_dovecot",
    "connect_dnsbl",
    "connect_earlytalker",
    "connect_limits",
    "data_clamav",
    "data_dkim_verify",
    "data_arc_verify",
    "data_dmarc",
    "data_rspamd",
    "data_spamd",
    "data_user_lists",
    "helo_checks",
    "mail_spf",
    "mail_verp",
    "mail_rate_limit",
    "mail_sender_login",
    "rcpt_greylist",
    "rcpt_restrictions",
    "rcpt_relay",
    "rcpt_quota",
    "rcpt_local_users",
    "rcpt_dovecot_users",
    "rcpt_user_lists",
    "queue_submission_cleanup",
    "queue_authentication_results",
    "queue_footer",
    "queue_dkim_sign",
    "queue_arc_seal",
    "queue_received_header",
    "queue_archive",
)
