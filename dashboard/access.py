"""Who may reach the dashboard: its login from the settings, checked before anything starts.

The upload tab runs the model on whatever it is sent, so the dashboard serves
without a login only on loopback, or beyond it when the operator says so with
``--insecure-no-auth``. A login with only one half set is an error, never a
silently open dashboard.
"""

from __future__ import annotations

import ipaddress
import logging

from steelsight.contract import Settings

log = logging.getLogger(__name__)


class LoginConfigError(ValueError):
    """The settings would serve the dashboard more openly than the operator can have meant."""


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_access(settings: Settings, insecure_no_auth: bool = False) -> tuple[str, str] | None:
    """The (user, password) Gradio should require, None for no login; raises :class:`LoginConfigError`."""
    user = settings.dashboard_user or None
    password = settings.dashboard_password.get_secret_value() if settings.dashboard_password else None
    password = password or None
    if bool(user) != bool(password):
        given, missing = (("STEELSIGHT_DASHBOARD_USER", "STEELSIGHT_DASHBOARD_PASSWORD") if user
                          else ("STEELSIGHT_DASHBOARD_PASSWORD", "STEELSIGHT_DASHBOARD_USER"))
        raise LoginConfigError(f"{given} is set but {missing} is not: set both to require a login, or neither")
    if user and password:
        return user, password
    host = settings.dashboard_host
    if is_loopback(host):
        return None
    if not insecure_no_auth:
        raise LoginConfigError(
            f"refusing to serve the dashboard on {host} without a login: anyone who reaches it could run the "
            "upload API. Set STEELSIGHT_DASHBOARD_USER and STEELSIGHT_DASHBOARD_PASSWORD, bind to 127.0.0.1, or "
            "pass --insecure-no-auth if something in front of it (a proxy with its own login) guards it")
    log.warning("SERVING THE DASHBOARD WITHOUT A LOGIN on %s (--insecure-no-auth): anyone who can reach this port "
                "can see every frame and run the upload API", host)
    return None
