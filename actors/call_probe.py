"""A do-nothing actor for measuring what a call costs (`loadtests/call_cost.py`).

`EchoActor.echo` answers its argument, through Ray or through the direct channel
(actors/direct.py), so the two ways of calling an actor can be compared on one machine.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from actors.runtime import DirectPort
from actors.shard import DirectMethods


@ray.remote(num_cpus=0, max_concurrency=1000)  # type: ignore[call-overload]
class EchoActor(DirectMethods):
    """Answers `echo(value)` with `value`."""

    direct_methods = ("echo",)

    async def echo(self, value: Any) -> Any:
        return value

    def pid(self) -> int:
        """The actor's process id (for reading its CPU time)."""
        return os.getpid()


class EchoPort(DirectPort):
    """Calls `echo` through Ray (`via_ray`) or direct (`direct_call`)."""

    def __init__(self) -> None:
        super().__init__(EchoActor.remote(), direct=True)  # type: ignore[attr-defined]

    async def pid(self) -> int:
        return int(await self.handle.pid.remote())

    async def via_ray(self, value: Any) -> Any:
        return await self.handle.echo.remote(value)

    async def direct_call(self, value: Any) -> Any:
        return await self._call("echo", value)
