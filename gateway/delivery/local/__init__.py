"""Local delivery (qmail-local): Maildir, mbox, programs, forwards and ``.qmail`` files.

:class:`LocalDeliveryAgent` is what the scheduler uses; the building blocks are public
for tests and tools. docs/local-delivery.md describes the behaviour for users.
"""

from gateway.delivery.local.agent import LOOP_REPLY, ForwardFunction, LocalDeliveryAgent
from gateway.delivery.local.dotqmail import NO_MAILBOX, DotQmail, Instruction, load_dotqmail
from gateway.delivery.local.maildir import Confinement, deliver_maildir
from gateway.delivery.local.mbox import deliver_mbox
from gateway.delivery.local.program import ProgramResult, run_program

__all__ = [
    "Confinement",
    "DotQmail",
    "ForwardFunction",
    "Instruction",
    "LOOP_REPLY",
    "LocalDeliveryAgent",
    "NO_MAILBOX",
    "ProgramResult",
    "deliver_maildir",
    "deliver_mbox",
    "load_dotqmail",
    "run_program",
]
