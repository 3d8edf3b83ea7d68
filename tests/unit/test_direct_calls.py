"""Direct calls (actors/direct.py): the channel the hot actor methods take beside Ray.

Real sockets on loopback; the "actor" is a DirectServer in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from actors.direct import DirectCallError, DirectClient, DirectServer, _frame, _read_frame


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body in a fresh event loop (the suite's tests are plain functions)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class Actor:
    """Stands in for an actor incarnation: a server with a few methods."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.server = DirectServer({"echo": self.echo, "fail": self.fail, "slow": self.slow})

    async def echo(self, argument: Any) -> Any:
        return argument

    async def fail(self, argument: Any) -> Any:
        raise ValueError(f"refused {argument}")

    async def slow(self, argument: Any) -> Any:
        await self.release.wait()
        return argument


class Resolver:
    """What Ray's `direct_address` call gives the client: the current incarnation's address."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.calls = 0

    async def __call__(self) -> tuple[str, int, bytes]:
        self.calls += 1
        return await self.actor.server.start("127.0.0.1")


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[Actor, Resolver, DirectClient]]:
    """An actor and a client of it, both closed at the end."""
    actor = Actor()
    resolver = Resolver(actor)
    client = DirectClient(resolver)
    try:
        yield actor, resolver, client
    finally:
        await client.close()
        await actor.server.close()


@in_loop
async def test_calls_pipeline_and_keep_types() -> None:
    async with connected() as (actor, resolver, client):
        values = [b"bytes", "text", 7, [{"root": b"\x00" * 32, "n": 1}], None]
        assert await asyncio.gather(*(client.call("echo", v) for v in values)) == values
        big = bytes(range(256)) * 40_000  # 10 MB: a large batch of journals
        assert await client.call("echo", big) == big
        assert resolver.calls == 1  # one connection for every call
        assert actor.server.calls == len(values) + 1


@in_loop
async def test_a_slow_call_does_not_hold_back_others() -> None:
    async with connected() as (actor, _resolver, client):
        slow = asyncio.ensure_future(client.call("slow", 1))
        assert await client.call("echo", 2) == 2  # answered while the slow call still runs
        assert not slow.done()
        actor.release.set()
        assert await slow == 1


@in_loop
async def test_a_method_that_raises_fails_only_its_call() -> None:
    async with connected() as (_actor, _resolver, client):
        with pytest.raises(DirectCallError, match="ValueError: refused 3"):
            await client.call("fail", 3)
        with pytest.raises(DirectCallError, match="KeyError"):  # a method the actor does not serve
            await client.call("drop_tables", None)
        assert await client.call("echo", "still open") == "still open"


@in_loop
async def test_a_wrong_token_is_refused() -> None:
    actor = Actor()
    host, port, _token = await actor.server.start("127.0.0.1")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.writelines(_frame(b"\x00" * 32))  # a guessed token
        writer.writelines(_frame([0, "echo", "hello"]))
        with pytest.raises(asyncio.IncompleteReadError):
            await _read_frame(reader)  # closed without an answer
        assert actor.server.calls == 0
    finally:
        writer.close()
        await actor.server.close()


@in_loop
async def test_actor_restart_fails_pending_calls_then_reconnects() -> None:
    """The actor dies with a call in flight: the call fails (the front end answers it retryable),
    and the next call resolves the restarted actor's new address and goes through."""
    first = Actor()
    resolver = Resolver(first)
    client = DirectClient(resolver)
    try:
        pending = asyncio.ensure_future(client.call("slow", "lost"))
        await asyncio.sleep(0.05)
        await first.server.close()
        assert client.connection is not None
        client.connection.writer.transport.abort()  # the process died: its sockets are gone
        with pytest.raises(DirectCallError, match="direct call lost"):
            await pending
        resolver.actor = Actor()  # Ray restarted the actor: new port, new token
        assert await client.call("echo", "again") == "again"
        assert resolver.calls == 2 and client.connects == 2
        await resolver.actor.server.close()
    finally:
        await client.close()


@in_loop
async def test_an_unreachable_actor_is_a_call_error() -> None:
    async def gone() -> tuple[str, int, bytes]:
        return "127.0.0.1", 1, b"t" * 32  # nothing listens on port 1

    client = DirectClient(gone)
    with pytest.raises(DirectCallError, match="unreachable"):
        await client.call("echo", 1)
