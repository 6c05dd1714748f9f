"""The blocking checks (pyspf, dkimpy) run in a thread pool of their own, so that a slow DNS
answer holds a pool thread and never the event loop or the default executor."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .resolver import DnsResolver, ThreadBridge

T = TypeVar("T")


class BlockingChecks:
    def __init__(self, resolver: DnsResolver, threads: int) -> None:
        self.resolver = resolver
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mailauth")

    def bridge(self) -> ThreadBridge:
        """DNS for a check about to run in the pool, answered by this event loop."""
        return ThreadBridge(self.resolver, asyncio.get_running_loop())

    async def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
