"""The web console: quarantine and queue pages for admins, on its own HTTPS listener.

A client of what exists (the queue and quarantine commands' functions, the queue
store), started by :class:`gateway.app.GatewayApp` when ``[console] enabled``; see
docs/console.md.
"""

from gateway.console.server import Console, start_console

__all__ = ["Console", "start_console"]
