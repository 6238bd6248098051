"""Remote delivery over SMTP: MX resolution, the SMTP client, and the delivery agent.

``RemoteDeliveryAgent(policy, resolver, hostname=...)`` is what the scheduler uses;
:mod:`~gateway.delivery.remote.mx` and :mod:`~gateway.delivery.remote.client` are its parts.
"""

from gateway.delivery.remote.agent import RemoteDeliveryAgent
from gateway.delivery.remote.client import SmtpConnection
from gateway.delivery.remote.failures import HostFailure, TlsFailure
from gateway.delivery.remote.mx import Destination, resolve_destinations, resolve_host

__all__ = [
    "Destination",
    "HostFailure",
    "RemoteDeliveryAgent",
    "SmtpConnection",
    "TlsFailure",
    "resolve_destinations",
    "resolve_host",
]
