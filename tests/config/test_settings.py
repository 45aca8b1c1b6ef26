"""Settings refuse to start without a secret in production, except for commands that sign nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _manage(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "SECRET_KEY"}}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_production_start_without_a_secret_key_is_a_clear_error() -> None:
    result = _manage("check")
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


def test_migrations_can_be_checked_without_a_secret_key() -> None:
    result = _manage("makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "No changes detected" in result.stdout


def _check_with(**extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"TRUST_X_FORWARDED_FOR", "TRUSTED_PROXIES", "TRUSTED_PROXY_COUNT"}}
    env.update({"DEBUG": "1", **extra})
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_old_forwarded_for_switch_stops_start_up_and_names_its_replacement() -> None:
    """TRUST_X_FORWARDED_FOR trusted the client-written first entry; quietly ignoring it would also be wrong."""
    result = _check_with(TRUST_X_FORWARDED_FOR="1")
    assert result.returncode != 0 and "TRUSTED_PROXY_COUNT" in result.stderr


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert _check_with(TRUSTED_PROXIES="10.0.0.0/8,127.0.0.1", TRUSTED_PROXY_COUNT="1").returncode == 0
    result = _check_with(TRUSTED_PROXIES="nginx.internal")
    assert result.returncode != 0 and "not an address or network" in result.stderr
