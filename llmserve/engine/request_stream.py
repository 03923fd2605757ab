"""RequestStream: one request's outputs as an async iterator, fed by the AsyncEngine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llmserve.outputs import RequestOutput


class Aborter(Protocol):
    """What a stream needs of its engine (an AsyncEngine): a way to abort its request."""

    def abort(self, request_ids: str | Iterable[str]) -> None: ...


class RequestStream:
    """Async iterator over one request's cumulative `RequestOutput`s.

    Outputs are cumulative, so a slow consumer only ever sees the latest one: nothing queues up
    behind it. Iteration ends after the finished output; an engine failure raises
    EngineDeadError. Leaving early (cancelling the consumer, or `break` out of `async for`)
    aborts the request.
    """

    def __init__(self, engine: Aborter, request_id: str, loop: asyncio.AbstractEventLoop,
                 arrival_time: float) -> None:
        self.request_id = request_id
        self.loop = loop
        self.arrival_time = arrival_time
        self.prompt_token_ids: list[int] = []
        self.first_token_time: float | None = None
        self.last_token_time = arrival_time
        self.num_tokens_seen = 0
        self.accepted: asyncio.Future | None = None  # resolved when the engine took the request
        self._engine = engine
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._finished = False  # the final output (or an error) arrived
        self._done = False  # the consumer has seen the end
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self._finished

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        # An async generator: `break` (or dropping it) closes it, and closing aborts.
        try:
            while True:
                try:
                    out = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield out
        finally:
            self.abort()

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                self._done = out.finished
                return out
            if self._error is not None:
                self._done = True
                raise self._error
            if self._done or self._finished:
                raise StopAsyncIteration
            self._event.clear()
            try:
                await self._event.wait()
            except asyncio.CancelledError:
                self.abort()
                raise

    def abort(self) -> None:
        """Abort the request unless it already finished (idempotent)."""
        if not self._finished:
            self._engine.abort(self.request_id)

    def _put(self, out: RequestOutput) -> None:
        self._latest = out
        self._finished = self._finished or out.finished
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._finished = True
        self._event.set()
