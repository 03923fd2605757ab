"""Tensor-parallel workers: ranks 1..N-1 of a model, driven in lock-step by rank 0 (the engine).

A worker joins the process group, loads its shard of the weights, sizes its share of the KV cache,
then loops: receive a step description (`StepArrays`, plain data), build the same tensors as every
other rank, run the forward and its slice of the LM head. It never samples.

Spawned workers (one host) get steps over a pipe, with `WorkerGroup` on rank 0's side checking
that they are alive; torchrun-launched workers (`run_env_worker`) get them by broadcast.
"""

from __future__ import annotations

import logging
import pickle
import signal
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from llmserve.config import EngineConfig
from llmserve.distributed.communication import broadcast_object
from llmserve.distributed.parallel_state import (
    destroy_tensor_parallel,
    init_tensor_parallel,
    timeout_seconds,
)
from llmserve.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_STOP = pickle.dumps(None)
# After a collective fails on rank 0, how long to wait for the worker that caused it to exit.
_DEATH_GRACE_S = 2.0


_FATAL = "; the engine cannot continue and fails its requests"
# Spawned workers re-import the main script: one that builds an engine at import time recurses.
_MAIN_GUARD_HINT = (
    " (a script that builds a tensor-parallel engine must do so under "
    "`if __name__ == \"__main__\":`, because workers are started with the spawn method)"
)


class WorkerError(RuntimeError):
    """A tensor-parallel rank died or failed: the engine cannot run further steps."""


def worker_main(
    config: EngineConfig, rank: int, world_size: int, port: int, conn: Connection,
    num_threads: int | None,
) -> None:
    """Body of a spawned worker process. Any failure is reported to rank 0, then it exits."""
    # Ctrl-C reaches the whole process group; rank 0 decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        conn.send("started")
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False,
            timeout=timedelta(seconds=timeout_seconds()),
        )
        init_tensor_parallel(rank, world_size, rank, config.model.torch_device, store=store)
        runner = ModelRunner(config)
        conn.send("ready")
        _serve_pipe(runner, conn)
        destroy_tensor_parallel()
    except BaseException:  # noqa: BLE001 - report whatever it was, then exit non-zero
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass  # rank 0 is gone
        raise SystemExit(1) from None


def _serve_pipe(runner: ModelRunner, conn: Connection) -> None:
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:
            return  # rank 0 exited
        step = pickle.loads(payload)
        if step is None:
            return
        runner.launch_prepared(step)


def run_env_worker(config: EngineConfig, rank: int, world_size: int, local_rank: int) -> None:
    """Body of a torchrun-launched rank > 0: serve broadcast steps until rank 0 says stop."""
    init_tensor_parallel(rank, world_size, local_rank, config.model.torch_device)
    try:
        runner = ModelRunner(config)
        logger.info("tensor-parallel rank %d of %d ready", rank, world_size)
        while (step := broadcast_object()) is not None:
            runner.launch_prepared(step)
    finally:
        destroy_tensor_parallel()


class WorkerGroup:
    """Rank 0's handles on spawned workers: processes, pipes, liveness and start-up handshakes."""

    def __init__(self, procs: list[Any], conns: list[Connection]) -> None:
        self.procs = procs
        self.conns = conns
        self.errors: dict[int, str] = {}  # rank -> traceback a worker reported
        self._stopped = False

    @classmethod
    def spawn(cls, config: EngineConfig, port: int, num_threads: int | None) -> WorkerGroup:
        ctx = torch.multiprocessing.get_context("spawn")
        world = config.tensor_parallel_size
        procs, conns = [], []
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(config, rank, world, port, child, num_threads),
                name=f"llmserve-tp-rank{rank}", daemon=True,
            )
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        return cls(procs, conns)

    def wait_for(self, message: str, timeout: float) -> None:
        """Wait until every worker has sent `message`; raise WorkerError if one dies first."""
        deadline = time.monotonic() + timeout
        for i, conn in enumerate(self.conns):
            while True:
                if conn.poll(0.05):
                    got = self._receive(i)
                    if got == message:
                        break
                if self.procs[i].exitcode is not None or i + 1 in self.errors:
                    text = self.describe(i, f"while waiting for it to be {message}")
                    if message == "started" and i + 1 not in self.errors:
                        text += _MAIN_GUARD_HINT
                    raise WorkerError(text)
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"tensor-parallel worker rank {i + 1} was not {message} after {timeout:.0f}s"
                    )

    def send(self, payload: bytes) -> None:
        """Hand one pickled step to every worker; raise WorkerError if one is dead."""
        for i, conn in enumerate(self.conns):
            if self.procs[i].exitcode is not None:
                raise WorkerError(self.describe(i, "before a step") + _FATAL)
            try:
                conn.send_bytes(payload)
            except OSError:
                self.procs[i].join(_DEATH_GRACE_S)
                raise WorkerError(self.describe(i, "before a step") + _FATAL) from None

    def explain(self, exc: BaseException, when: str) -> WorkerError:
        """Turn a failed collective on rank 0 into an error naming the worker that caused it."""
        deadline = time.monotonic() + _DEATH_GRACE_S
        suffix = _FATAL if "step" in when else ""
        while time.monotonic() < deadline:
            for i in range(len(self.procs)):
                self._drain(i)
                if self.procs[i].exitcode is not None or i + 1 in self.errors:
                    return WorkerError(self.describe(i, when) + suffix)
            time.sleep(0.02)
        return WorkerError(f"tensor-parallel rank 0 failed {when}: {exc}{suffix}")

    def describe(self, i: int, when: str) -> str:
        proc, rank = self.procs[i], i + 1
        self._drain(i)
        code = proc.exitcode
        if code is None:
            status = "failed"
        elif code < 0:
            try:
                status = f"died (killed by {signal.Signals(-code).name})"
            except ValueError:
                status = f"died (killed by signal {-code})"
        else:
            status = f"died (exit code {code})"
        text = f"tensor-parallel worker rank {rank} (pid {proc.pid}) {status} {when}"
        if rank in self.errors:
            text += f"; its error: {self.errors[rank].strip().splitlines()[-1]}"
        return text

    def _receive(self, i: int) -> Any:
        try:
            got = self.conns[i].recv()
        except (EOFError, OSError):
            return None
        if isinstance(got, tuple) and got and got[0] == "error":
            self.errors[i + 1] = got[1]
            logger.error("tensor-parallel worker rank %d failed:\n%s", i + 1, got[1])
        return got

    def _drain(self, i: int) -> None:
        try:
            while self.conns[i].poll():
                if self._receive(i) is None:
                    return
        except OSError:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Ask every worker to exit, then kill any that do not (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        for conn in self.conns:
            try:
                conn.send_bytes(_STOP)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for conn in self.conns:
            conn.close()
