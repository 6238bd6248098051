"""Login and logout, rate-limited per client address.

An admin (the admins file, or a mail login in ``[console] admin_users`` whose mail
password checks out) gets an ``admin`` session; with ``[console] users = true``
any other login is checked by the mail verifier (:mod:`gateway.console.users`) and gets
a ``user`` session holding that user's addresses. A failure counts against the client
address either way.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.console.server import COOKIE, LOGIN_COOKIE, login_token, login_token_ok, redirect
from gateway.console.users import USER, LoginUnavailable, addresses_of, check_mail_login

if TYPE_CHECKING:
    from gateway.console.server import Console
    from gateway.console.sessions import Session

__all__ = ["add_routes"]

log = logging.getLogger(__name__)

ADMIN = "admin"
"""The scope of an admin session (every page)."""


def _cookie(response: web.StreamResponse, name: str, value: str, max_age: float | None = None) -> None:
    response.set_cookie(name, value, path="/", secure=True, httponly=True, samesite="Strict",
                        max_age=None if max_age is None else int(max_age))


def add_routes(console: Console, app: web.Application) -> None:
    """``/``, ``/login`` (GET, POST) and ``/logout`` (POST)."""

    def login_page(request: web.Request, status: int = 200, error: str = "") -> web.Response:
        token = login_token(console)
        response = console.render("login.html", None, status=status, csrf=token, error=error)
        _cookie(response, LOGIN_COOKIE, token)
        return response

    async def home(request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/quarantine")

    async def show_login(request: web.Request) -> web.StreamResponse:
        if console.sessions.get(request.cookies.get(COOKIE)) is not None:
            raise web.HTTPSeeOther("/quarantine")
        return login_page(request)

    async def do_login(request: web.Request) -> web.StreamResponse:
        client = request.remote or "?"
        wait = console.limiter.retry_after(client)
        if wait:
            log.warning("console: login refused, too many failures client=%s", client)
            response = login_page(request, 429, f"Too many failed logins from your address: "
                                  f"try again in {math.ceil(wait / 60)} minutes.")
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        form = await request.post()
        if not login_token_ok(console, request, form.get("csrf")):
            raise web.HTTPForbidden(text="missing or wrong CSRF token (reload the login page)\n")
        login, password = form.get("login"), form.get("password")
        if not isinstance(login, str) or not isinstance(password, str) or len(login) > 200 or len(password) > 1024:
            raise web.HTTPBadRequest(text="login and password expected\n")
        async with console._hashing:
            is_admin = await console.in_thread(console.admins.check, login, password)
        scope, addresses, user = ADMIN, frozenset[str](), None
        admin_users = console.settings.admin_users
        if not is_admin and (console.settings.users or login in admin_users):
            try:
                user = await check_mail_login(console.gateway_app, login, password, client)
            except LoginUnavailable as exc:
                log.warning("console: user login not checked login=%r client=%s: %s", login[:64], client, exc)
                return login_page(request, 503, "Your password cannot be checked now; try again later.")
            if user is not None and (login in admin_users or user in admin_users):
                is_admin = True  # an admin by the mail password (Dovecot, the users file)
            elif user is not None and console.settings.users:
                scope = USER
                addresses = await console.in_thread(addresses_of, console.policy.local, user)
            else:
                user = None
        if not is_admin and user is None:
            console.limiter.failed(client)
            log.warning("console: login failed login=%r client=%s", login[:64], client)
            return login_page(request, 401, "Wrong login or password.")
        token, _ = console.sessions.create(user or login, scope, addresses=addresses)
        log.info("console: login login=%s scope=%s client=%s", user or login, scope, client)
        response = redirect("/quarantine")
        _cookie(response, COOKIE, token, console.settings.session_lifetime)
        response.del_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    @console.requires(ADMIN, USER)
    async def logout(request: web.Request, session: Session) -> web.StreamResponse:
        console.sessions.end(request.cookies.get(COOKIE))
        log.info("console: logout login=%s", session.login)
        response = redirect("/login")
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    app.router.add_get("/", home)
    app.router.add_get("/login", show_login)
    app.router.add_post("/login", do_login)
    app.router.add_post("/logout", logout)
