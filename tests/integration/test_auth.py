"""The dashboard refuses to serve an open upload API beyond loopback, and a half-set login."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import pytest

from steelsight.devstack import free_port, wait_until

from ..helpers import ChildProcess


def _run_dashboard(env_settings: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("STEELSIGHT_DASHBOARD_")}
    env |= {"STEELSIGHT_DASHBOARD_PORT": str(free_port()), "STEELSIGHT_DASHBOARD_METRICS_PORT": str(free_port()),
            "STEELSIGHT_REDIS_URL": "redis://127.0.0.1:1/0", "STEELSIGHT_S3_ENDPOINT": "127.0.0.1:1",
            "STEELSIGHT_S3_ACCESS_KEY": "unused", "STEELSIGHT_S3_SECRET_KEY": "unused"} | env_settings
    try:
        return subprocess.run([sys.executable, "-m", "steelsight.cli", "dashboard", *args], env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:  # it went on to serve
        pytest.fail(f"the dashboard started instead of refusing: {(exc.stderr or b'')[-500:]!r}")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_no_login_beyond_loopback_is_refused(host):
    done = _run_dashboard({}, "--host", host)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "STEELSIGHT_DASHBOARD_USER" in done.stderr and "--insecure-no-auth" in done.stderr, done.stderr


@pytest.mark.parametrize("given", [{"STEELSIGHT_DASHBOARD_PASSWORD": "s3cret-pass"},
                                   {"STEELSIGHT_DASHBOARD_USER": "operator"},
                                   {"STEELSIGHT_DASHBOARD_USER": "operator", "STEELSIGHT_DASHBOARD_PASSWORD": ""}])
def test_half_set_login_is_an_error(given):
    done = _run_dashboard(given)  # on loopback too: a login the operator meant to set is never silently off
    assert done.returncode == 2, done.stderr[-2000:]
    assert "both" in done.stderr and "STEELSIGHT_DASHBOARD_PASSWORD" in done.stderr, done.stderr


def test_access_rules():
    from steelsight.contract import Settings
    from steelsight.dashboard.access import LoginConfigError, check_access

    def check(host, user=None, password=None, insecure=False):
        return check_access(Settings(dashboard_host=host, dashboard_user=user, dashboard_password=password),
                            insecure)

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert check(host) is None  # loopback stays open: `make run` needs no login
    assert check("0.0.0.0", "operator", "pw") == ("operator", "pw")
    assert check("127.0.0.1", "operator", "pw") == ("operator", "pw")
    assert check("0.0.0.0", insecure=True) is None
    for bad in (dict(host="0.0.0.0"), dict(host="example.org"), dict(host="10.1.2.3"),
                dict(host="127.0.0.1", password="pw"), dict(host="127.0.0.1", user="u"),
                dict(host="0.0.0.0", user="u", insecure=True)):
        with pytest.raises(LoginConfigError):
            check(**bad)


def test_insecure_no_auth_serves_with_a_loud_warning(settings, tmp_path):
    dashboard = ChildProcess(settings, tmp_path, "dashboard-open", ["dashboard", "--host", "0.0.0.0",
                                                                    "--insecure-no-auth"])
    try:
        url = f"http://127.0.0.1:{settings.dashboard_port}/config"
        wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 120, "the dashboard")
    finally:
        dashboard.kill(signal.SIGTERM)
    log = dashboard.output()
    assert "WARNING" in log and "WITHOUT A LOGIN" in log and "0.0.0.0" in log, log[-2000:]
