"""Does Redis fit the line? :func:`~steelsight.contract.redis_bytes_needed` against Redis's own limits."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .contract import (
    REDIS_HEADROOM,
    REDIS_MAXMEMORY_POLICY,
    REDIS_RECORD_BYTES,
    REDIS_TILE_BYTES,
    Settings,
    redis_bytes_needed,
)

log = logging.getLogger("steelsight.sizing")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}  # Redis's own units: 1mb = 1 MiB, 1m = 10^6


def parse_bytes(text: str) -> int:
    """``3gb``, ``512mb``, ``1GiB`` or a plain number of bytes, as redis.conf reads them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 3gb, 512mb, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def mib(n: float) -> str:
    return f"{n / 1024**2:,.0f} MiB"


@dataclass(frozen=True)
class RedisMemory:
    used: int
    maxmemory: int
    policy: str


def redis_memory(connection) -> RedisMemory:
    """Used bytes, ``maxmemory`` (0: none) and eviction policy, from ``INFO memory``."""
    info = connection.info("memory")
    return RedisMemory(int(info["used_memory"]), int(info["maxmemory"]), str(info["maxmemory_policy"]))


def sizing_problems(settings: Settings, fps: float, maxmemory: int, policy: str | None = None,
                    tiles_per_frame: int = 0) -> list[str]:
    """Why a Redis with ``maxmemory`` (and ``policy``, when known) cannot hold ``fps`` frames/s; empty if it can."""
    needed = redis_bytes_needed(settings, fps, tiles_per_frame=tiles_per_frame)
    problems = []
    if maxmemory <= 0:
        problems.append(f"Redis has no maxmemory: it grows until the OOM killer restarts it, and the append-only "
                        f"file reloads the same data. Set maxmemory to at least {mib(needed)} and "
                        f"maxmemory-policy {REDIS_MAXMEMORY_POLICY}")
    elif needed > maxmemory:
        # the formula is linear in result_ttl_s: solve it for the retention that fits
        per_ttl_second = fps * (REDIS_RECORD_BYTES + tiles_per_frame * REDIS_TILE_BYTES) * REDIS_HEADROOM
        fitting_ttl = int(settings.result_ttl_s - (needed - maxmemory) / per_ttl_second) if per_ttl_second else 0
        advice = (f"lower STEELSIGHT_RESULT_TTL_S to {fitting_ttl} s or less, or raise maxmemory"
                  if fitting_ttl > 0 else "raise maxmemory (no result retention fits)")
        problems.append(f"{fps:g} frames/s with results kept {settings.result_ttl_s} s needs {mib(needed)} of "
                        f"Redis, but maxmemory is {mib(maxmemory)}: {advice}")
    if policy is not None and policy != REDIS_MAXMEMORY_POLICY:
        why = {"noeviction": "a full Redis refuses every write, so workers cannot store results and the line stops",
               }.get(policy, "it may evict queued jobs and lose frames" if policy.startswith("allkeys")
                     else f"only {REDIS_MAXMEMORY_POLICY} is tested to keep every queued frame")
        problems.append(f"maxmemory-policy is {policy}: {why}. Set maxmemory-policy {REDIS_MAXMEMORY_POLICY} "
                        "(it evicts only keys with a TTL: old results, never queued frames)")
    return problems


def warn_if_undersized(settings: Settings, connection, fps: float | None) -> list[str]:
    """Log each sizing problem of the connected Redis loudly; the problems, or [] when it fits or cannot be read."""
    try:
        memory = redis_memory(connection)
    except Exception as exc:  # an ACL without INFO, or a managed Redis that hides it: say so, do not stop
        log.warning("cannot read Redis's maxmemory (%s): Redis sizing not checked", exc)
        return []
    problems = sizing_problems(settings, fps or 0.0, memory.maxmemory, memory.policy)
    for problem in problems:
        log.error("REDIS SIZING: %s", problem)
    return problems
