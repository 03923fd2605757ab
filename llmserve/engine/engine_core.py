"""The engine-core process: an LLMEngine stepping on its own, fed and drained over two pipes.

The frontend (`core_client.py`) sends small commands; the core applies every command that has
arrived, runs one step and sends back one message with everything that step produced. It never
waits for the frontend between steps, so HTTP work and model work overlap on separate cores and
separate GILs.

Commands (tuples; the first item names them):
    ("add", request_id, prompt, params, arrival_time, priority)
    ("abort", [request_ids])
    ("abort_all",)
    ("stop",)
Messages back:
    ("ready", info)                     once, after the engine is built
    ("failed", error)                   the engine could not be built
    ("step", replies, outputs, stats, step_stats)
        replies: ("added", request_id, prompt_token_ids) | ("rejected", request_id, error)
        outputs: `output_wire` deltas; step_stats: the engine's `last_step` when a step ran
    ("dead", error, traceback_text)     a step raised; the process then exits
    ("stopped",)                        after "stop"
The core exits when the frontend goes away (its end of a pipe closes).
"""

from __future__ import annotations

import logging
import pickle
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)


def portable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a ValueError/RuntimeError with the same message
    (ValueError stays ValueError: the frontend maps it to a 400)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling problem: fall back to a plain error
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(str(exc))


def run_engine_core(engine_kwargs: dict[str, Any], cpu_threads: int | None,
                    commands: Connection, messages: Connection, log_level: int) -> None:
    """Child-process entry point: build the engine, report ready, serve commands until told to
    stop or until the frontend disappears."""
    # Ctrl-C and SIGTERM go to the whole process group; the frontend decides when the core stops
    # (after draining), so the core must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        from llmserve.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_args(**engine_kwargs)
        # Detokenizing is the frontend's job for requests without stop strings (see
        # OutputDecoder.detokenize): it keeps the step loop shorter.
        engine.outputs.text_only_for_stop_strings = True
    except BaseException as exc:  # noqa: BLE001 - reported to the frontend, which raises it
        messages.send(("failed", portable_error(exc)))
        return
    try:
        messages.send(("ready", {"num_kv_blocks": engine.kv.num_blocks}))
        _serve(engine, commands, messages)
    except (EOFError, OSError):
        pass  # the frontend is gone: nothing left to serve
    finally:
        engine.shutdown()


def _serve(engine: Any, commands: Connection, messages: Connection) -> None:
    from llmserve.engine.output_wire import OutputEncoder

    encoder = OutputEncoder()
    live: set[str] = set()  # accepted and not yet reported finished
    has_work = False
    last_step = None
    while True:
        batch = [] if has_work else [commands.recv()]  # block only when idle
        while commands.poll():
            batch.append(commands.recv())
        replies: list[tuple] = []
        aborts: set[str] = set()
        for command in batch:
            kind = command[0]
            if kind == "add":
                _, rid, prompt, params, arrival, priority = command
                try:
                    ids = engine.add_request(rid, prompt, params, arrival_time=arrival,
                                             priority=priority)
                except Exception as exc:  # noqa: BLE001 - the caller's bad input
                    replies.append(("rejected", rid, portable_error(exc)))
                else:
                    live.add(rid)
                    replies.append(("added", rid, list(ids)))
            elif kind == "abort":
                aborts.update(command[1])
            elif kind == "abort_all":
                aborts.update(live)
            elif kind == "stop":
                messages.send(("stopped",))
                return
        try:
            aborted = [rid for rid in aborts if rid in live]
            if aborted:
                engine.abort_request(aborted)
            outputs = []
            # An aborted request reports its final "abort" output in the next step.
            if aborted or engine.has_unfinished_requests():
                outputs = engine.step()
            has_work = engine.has_unfinished_requests()
            step = engine.last_step if engine.last_step is not last_step else None
            last_step = engine.last_step
            wire = encoder.encode(outputs)
            stats = engine.stats()
        except Exception as exc:  # noqa: BLE001 - fatal for every request; the frontend fails them
            logger.exception("engine step failed")
            messages.send(("dead", portable_error(exc), traceback.format_exc()))
            return
        for out in outputs:
            if out.finished:
                live.discard(out.request_id)
        # Plain pickle (what `recv` reads too): the per-step message skips ForkingPickler's
        # set-up, a measurable share of a millisecond-scale step.
        messages.send_bytes(pickle.dumps(("step", replies, wire, stats, step),
                                         pickle.HIGHEST_PROTOCOL))
