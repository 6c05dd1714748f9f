"""A TCP relay on loopback that can stop forwarding, for tests of a network path that drops
packets (a partition) between a component and its Redis.

    async with TcpProxy(port_of_redis) as proxy:   # proxy.url: redis://127.0.0.1:<port>/0
        proxy.pause()    # connections are still accepted, but no byte goes either way
        proxy.resume()   # what was held goes on, in order, then the rest

While paused it does not read from either side: the bytes wait in the kernel's socket buffers
(and a sender whose buffers are full blocks), as they would behind a path that drops packets
and gets them retransmitted once it heals. Neither side sees an error or a close: only
silence, which only a deadline of their own ends. A side that closes while paused has its
last bytes delivered on resume, then the other side is closed.
"""

from __future__ import annotations

import asyncio
import contextlib

HOST = "127.0.0.1"
CHUNK = 65536


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        #: connections accepted so far (paused or not)
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """A Redis URL that goes through the proxy."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._relays):
            task.cancel()  # closes both sides of each connection
        await asyncio.gather(*self._relays, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
            # one direction ending (a close, a reset) ends the other: as one TCP connection
            pipes = [
                asyncio.ensure_future(self._pipe(client_r, upstream_w)),
                asyncio.ensure_future(self._pipe(upstream_r, client_w)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except OSError:
            pass
        except asyncio.CancelledError:
            pass  # stop(): ended here, as asyncio's server callback wants its tasks to end
        finally:
            self._relays.discard(task)
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.close()  # what was written first, then a FIN

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    return
                await self._flowing.wait()  # paused while the bytes were on their way in
                writer.write(data)
                await writer.drain()
