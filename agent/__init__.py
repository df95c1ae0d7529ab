"""postbote: fetch mail from POP3 mailboxes and redeliver it without ever losing a message."""

from agent.errors import DeliveryError
from agent.hookspecs import hookimpl
from agent.message import Message, Verdict

__version__ = "0.1.0"
__all__ = ["DeliveryError", "Message", "Verdict", "__version__", "hookimpl"]
