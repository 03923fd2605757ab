"""The messages between an AsyncEngine and the step loop that drives its LLMEngine.

Commands go from the frontend to the loop, reports come back. In thread mode they are handed over
as these objects; between processes they cross a pipe through `dumps` / `loads`. The full
protocol is specified in docs/engine_api.md ("The engine-core pipe").

On the pipe a message travels as a plain tuple, `(kind code, *fields)`: a tuple pickles several
times faster than a NamedTuple (whose class is looked up and whose `__new__` runs per object),
and the per-step report is sent every few milliseconds.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from llmserve.sampling_params import SamplingParams

# ---------------------------------------------------------------- frontend -> loop


class AddRequest(NamedTuple):
    """Add a request; answered by `Added` or `Rejected` in a `StepReport`."""

    request_id: str
    prompt: str | list[int] | dict
    params: SamplingParams
    arrival_time: float
    priority: int  # lower is served first (vLLM's convention); 0 by default, batch lines 10


class Abort(NamedTuple):
    """Abort these requests (ids the loop does not hold are ignored)."""

    request_ids: list[str]


class AbortAll(NamedTuple):
    """Abort every request the loop holds at the moment it reads this."""


class Stop(NamedTuple):
    """Stop the loop; it answers `Stopped` and applies nothing sent after this."""


Command = AddRequest | Abort | AbortAll | Stop

# ---------------------------------------------------------------- loop -> frontend


class Added(NamedTuple):
    """Reply: the engine accepted the request; its prompt token ids."""

    request_id: str
    prompt_token_ids: list[int]


class Rejected(NamedTuple):
    """Reply: the engine refused the request (ValueError for bad input)."""

    request_id: str
    error: BaseException


Reply = Added | Rejected


class StepReport(NamedTuple):
    """Everything one loop iteration produced: sent once per iteration, even an idle one that
    only answered adds (thread mode sends the answers to adds ahead, in a report of their own).

    `outputs` are `RequestOutput`s in thread mode and `output_wire.WireOutput` deltas on the
    pipe; `step_stats` is the engine's `last_step` when a step ran, else None.
    """

    replies: list[Reply]
    outputs: list[Any]
    stats: dict
    step_stats: Any


class Ready(NamedTuple):
    """Start-up (process mode only): the engine is built."""

    info: dict


class Failed(NamedTuple):
    """Start-up (process mode only): the engine could not be built; the process exits."""

    error: BaseException


class Dead(NamedTuple):
    """The loop ended with an error; every open request fails with it.

    `traceback` is the failed step's traceback, or None when the engine-core process vanished
    (the frontend builds this message itself then).
    """

    error: BaseException
    traceback: str | None


class Stopped(NamedTuple):
    """The loop ended after `Stop`."""


CoreMessage = StepReport | Ready | Failed | Dead | Stopped

# ---------------------------------------------------------------- the pipe

_KINDS: tuple[type, ...] = (AddRequest, Abort, AbortAll, Stop, StepReport, Ready, Failed, Dead,
                            Stopped)
_CODES = {kind: code for code, kind in enumerate(_KINDS)}


def dumps(message: Command | CoreMessage) -> bytes:
    """The pipe form of a message: a pickled plain tuple `(kind code, *fields)`."""
    # Plain pickle, not multiprocessing's ForkingPickler: it skips a per-call set-up that is a
    # measurable share of a millisecond-scale step.
    return pickle.dumps((_CODES[type(message)], *message), pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Command | CoreMessage:
    """Rebuild a message from `dumps`' bytes."""
    fields = pickle.loads(data)
    return _KINDS[fields[0]]._make(fields[1:])


# ---------------------------------------------------------------- the two ends


class CoreHandle(Protocol):
    """What an AsyncEngine needs of the thing that runs its step loop (a thread of this process,
    `thread_core.ThreadCore`, or a child process, `core_client.EngineCoreClient`)."""

    @property
    def pid(self) -> int | None:
        """The engine-core process id (None in thread mode)."""

    def start(self, deliver: Callable[[CoreMessage], None]) -> None:
        """Start the loop; `deliver` gets every report, on one thread that is not the caller's."""

    def send(self, command: Command) -> None:
        """Hand the loop a command (thread-safe); raises EngineDeadError if it is gone."""

    def shutdown(self, timeout: float) -> None:
        """Stop the loop and wait up to `timeout` s for it (idempotent)."""
