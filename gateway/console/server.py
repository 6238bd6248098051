"""The console's HTTPS listener: the aiohttp application, its security rules, its life.

Every response carries a Content-Security-Policy that allows no script at all and
nothing from another origin (the console has no JavaScript), ``no-store`` caching and
``frame-ancestors 'none'``. Every page but the login page needs a session of the right
scope (:func:`Console.requires`); every POST carries the session's CSRF token (the
login form a signed one, doubled in a cookie). Queue files are read and changed in the
gateway's thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import importlib
import logging
import pkgutil
import re
import secrets
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import jinja2
from aiohttp import web

from gateway.console.accounts import Admins, ensure_first_admin
from gateway.console.sessions import LoginLimiter, Session, SessionTable, csrf_pair_ok, new_login_token

__all__ = ["Console", "start_console"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SessionHandler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]

COOKIE = "__Host-console"
"""The session cookie (``__Host-``: Secure, path /, no Domain: this host only)."""
LOGIN_COOKIE = "__Host-console-login"
"""The login form's CSRF token, before there is a session."""
QID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_HERE = Path(__file__).parent
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def redirect(location: str) -> web.Response:
    """303 See Other to a path of the console (after a POST, the page to show)."""
    return web.Response(status=303, headers={"Location": location})


class Console:
    """The web console of one gateway process (the master, or the single one)."""

    def __init__(self, gateway_app: Any, ssl_context: ssl.SSLContext, admins_file: Path) -> None:
        """
        :param gateway_app: the :class:`gateway.app.GatewayApp`: its queue store, thread
            pool, scheduler and current policy
        """
        self.gateway_app = gateway_app
        settings = gateway_app.policy.console
        self.settings = settings
        self.ssl_context = ssl_context
        self.admins = Admins(admins_file)
        self.sessions = SessionTable(idle=settings.session_timeout, lifetime=settings.session_lifetime)
        self.limiter = LoginLimiter(max_failures=settings.max_login_failures, window=settings.login_window)
        self.secret = secrets.token_bytes(32)
        self._hashing = asyncio.Semaphore(2)  # scrypt is costly on purpose: at most 2 at once
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True,
        )
        self.runner: web.AppRunner | None = None
        self.port = 0

    # -- plumbing ----------------------------------------------------------

    @property
    def store(self) -> Any:
        return self.gateway_app.queue

    @property
    def policy(self) -> Any:
        return self.gateway_app.policy

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (queue files, scrypt) in the gateway's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.gateway_app.executor, functools.partial(fn, *args))

    def wake(self, qid: str) -> None:
        """Tell the scheduler a message is due now (released, retried)."""
        scheduler = self.gateway_app.scheduler
        if scheduler is not None:
            scheduler.notify(qid)

    def render(self, name: str, session: Session | None, status: int = 200, **values: Any) -> web.Response:
        """The template ``name`` as an HTML response (values escaped)."""
        html = self.templates.get_template(name).render(session=session, **values)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def requires(self, *scopes: str) -> Callable[[SessionHandler], Handler]:
        """A handler for logged-in sessions of one of ``scopes``; POSTs must carry its CSRF token.

        Without a session a GET goes to the login page and a POST is refused (403), as
        is a POST whose token is missing or wrong, and a session of another scope.
        """

        def decorate(handler: SessionHandler) -> Handler:
            @functools.wraps(handler)
            async def checked(request: web.Request) -> web.StreamResponse:
                session = self.sessions.get(request.cookies.get(COOKIE))
                if session is None:
                    if request.method == "GET":
                        raise web.HTTPSeeOther("/login")
                    raise web.HTTPForbidden(text="not logged in\n")
                if session.scope not in scopes:
                    raise web.HTTPForbidden(text="not allowed\n")
                if request.method == "POST":
                    form = await request.post()
                    token = form.get("csrf")
                    if not isinstance(token, str) or not hmac.compare_digest(token, session.csrf):
                        log.warning("console: POST %s refused: bad CSRF token login=%s client=%s",
                                    request.path, session.login, request.remote)
                        raise web.HTTPForbidden(text="missing or wrong CSRF token\n")
                return await handler(request, session)

            return checked

        return decorate

    @staticmethod
    async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(_HEADERS)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.on_response_prepare.append(self._secure_headers)
        # Each page is a module of this package with ``add_routes(console, app)``: a new
        # page registers itself by being there, without an edit here.
        for info in sorted(pkgutil.iter_modules([str(_HERE)]), key=lambda m: m.name):
            module = importlib.import_module(f"gateway.console.{info.name}")
            add_routes = getattr(module, "add_routes", None)
            if add_routes is not None:
                add_routes(self, app)
        app.router.add_static("/static/", _HERE / "static", append_version=False)
        return app

    # -- life cycle --------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener; log its address."""
        settings = self.settings
        self.runner = web.AppRunner(self.application(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, settings.address, settings.port, ssl_context=self.ssl_context, backlog=64)
        try:
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            self.runner = None
            raise
        self.port = int(self.runner.addresses[0][1])

    @property
    def url(self) -> str:
        host = self.settings.address
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}/"

    async def stop(self) -> None:
        """Close the listener and forget every session."""
        self.sessions.clear()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def start_console(gateway_app: Any) -> Console | None:
    """Start the console ``[console]`` asks for; log its address, or why it did not start.

    A console that cannot start (its port in use, the certificate unreadable) is logged
    as an ERROR and the gateway goes on without it: mail matters more than the console.
    """
    from gateway.smtp.tls import server_context

    policy = gateway_app.policy
    var_dir = Path(policy.server.var_dir)
    try:
        context = await asyncio.to_thread(server_context, policy.tls, var_dir, policy.server.hostname)
        if policy.console.admins_file is not None:
            admins_file, first = Path(policy.console.admins_file), None
        else:
            admins_file, first = await asyncio.to_thread(ensure_first_admin, var_dir)
        console = Console(gateway_app, context, admins_file)
        await console.start()
    except Exception as exc:  # a boundary: the console is optional, mail is not
        log.error("console not started on %s:%d: %s", policy.console.address, policy.console.port, exc)
        return None
    count = await asyncio.to_thread(console.admins.count)
    log.info("console on %s admins_file=%s admins=%d", console.url, admins_file, count)
    if first is not None:
        log.warning("console: first start: log in as 'admin' with the password in %s "
                    "(then delete that file; add admins with gateway passwd)", first)
    elif not count:
        log.warning("console: no admins in %s: nobody can log in (add one with gateway passwd LOGIN)", admins_file)
    return console


def login_token(console: Console) -> str:
    """A fresh signed token for the login form."""
    return new_login_token(console.secret)


def login_token_ok(console: Console, request: web.Request, form_value: object) -> bool:
    return csrf_pair_ok(console.secret, request.cookies.get(LOGIN_COOKIE),
                        form_value if isinstance(form_value, str) else None)
