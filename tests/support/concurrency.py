"""Making two concurrent calls overlap where a race would show."""

from __future__ import annotations

import asyncio
from typing import Any


def meet_before(monkeypatch: Any, owner: type, method: str, count: int = 2, timeout: float = 1.0) -> None:
    """Replaces `owner.method` so that each of its first `count` calls waits, before doing its work, until all of
    them have arrived or `timeout` seconds have passed. Calls that do not hold each other up (no lock between their
    read and this point) all arrive and then act on what each read; a call held up by another's lock cannot arrive,
    and the others go on after the timeout."""
    arrived = [asyncio.Event() for _ in range(count)]
    turn = iter(range(count))
    real = getattr(owner, method)

    async def meeting(self, *args, **kwargs):
        mine = next(turn, None)
        if mine is not None:
            arrived[mine].set()
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in arrived)), timeout=timeout)
            except TimeoutError:
                pass
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, meeting)
