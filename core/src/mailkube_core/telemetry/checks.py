"""Named health checks (sync or async callables returning bool), run concurrently with a timeout."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: a check: True means healthy. Sync checks run on the event loop and must not block.
Check = Callable[[], bool | Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    #: "ok", "returned False", "timed out after 2s", "raised ValueError: ..."
    detail: str


class CheckSet:
    """A set of named checks; a check that raises, times out or returns non-True fails."""

    def __init__(self, kind: str, timeout: float) -> None:
        self.kind = kind
        self.timeout = timeout
        self._checks: dict[str, Check] = {}

    def add(self, name: str, fn: Check) -> None:
        """Register ``fn`` under ``name`` (replacing a check of the same name)."""
        if not name:
            raise ValueError("a check needs a name")
        self._checks[name] = fn

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def names(self) -> list[str]:
        return list(self._checks)

    async def run(self) -> list[CheckResult]:
        """Every check's result, in registration order."""
        checks = list(self._checks.items())
        return list(await asyncio.gather(*(self._run_one(name, fn) for name, fn in checks)))

    async def _run_one(self, name: str, fn: Check) -> CheckResult:
        try:
            async with asyncio.timeout(self.timeout):
                result = fn()
                if inspect.isawaitable(result):
                    result = await result
            ok = bool(result)
        except TimeoutError:
            log.warning("%s check %r timed out after %gs", self.kind, name, self.timeout)
            return CheckResult(name, False, f"timed out after {self.timeout:g}s")
        except Exception as error:
            log.warning("%s check %r raised %r", self.kind, name, error)
            return CheckResult(name, False, f"raised {type(error).__name__}")
        return CheckResult(name, ok, "ok" if ok else "returned False")
