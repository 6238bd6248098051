"""A plugin-based SMTP filtering gateway in the spirit of qmail."""

from gateway.address import Address
from gateway.hooks import hookimpl
from gateway.model import Message, Recipient, Session, StashKey, Transaction
from gateway.verdicts import Action, PermanentFailure, Reply, TemporaryFailure, Verdict

__all__ = [
    "Action",
    "Address",
    "Message",
    "PermanentFailure",
    "Recipient",
    "Reply",
    "Session",
    "StashKey",
    "TemporaryFailure",
    "Transaction",
    "Verdict",
    "hookimpl",
]
__version__ = "0.1.0"
