"""Executors: run one model's tensor-parallel ranks in lock-step for the engine.

At tensor_parallel_size=1 the engine drives a plain ModelRunner: no process, no collective. At N > 1
the engine's process is rank 0: it holds a shard of the model and, for each step, sends the step's
plain-data description (`StepArrays`) to ranks 1..N-1 before running its own forward. Every rank
builds the same tensors from it; the collectives inside the forward keep the ranks in lock-step.
Only rank 0 samples.

- `MultiprocExecutor`: ranks 1..N-1 are spawned worker processes on this host, steps go over
  pipes. Workers are checked for life before each step, and a collective that fails because a
  peer died becomes a `WorkerError` naming the rank and how it died.
- `EnvExecutor`: all ranks were launched by torchrun (env:// rendezvous, one or several nodes),
  steps go by broadcast on a gloo group. A dead peer surfaces as a failed collective; a hung one
  after the distributed timeout (`LLMSERVE_DISTRIBUTED_TIMEOUT_S`).

Any failure during a tensor-parallel step is fatal: the ranks are out of lock-step, so the
executor stops its workers and this step and every later one raise the same `WorkerError`.
"""

from __future__ import annotations

import gc
import logging
import pickle
import threading
import weakref
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from llmserve.config import EngineConfig
from llmserve.distributed.communication import broadcast_object
from llmserve.distributed.parallel_state import (
    destroy_tensor_parallel,
    env_launch,
    init_tensor_parallel,
    timeout_seconds,
)
from llmserve.engine.input_batch import StepArrays
from llmserve.engine.model_runner import InFlightStep, ModelRunner
from llmserve.engine.scheduler import SchedulerOutput
from llmserve.engine.worker import WorkerError, WorkerGroup, run_env_worker

__all__ = ["EnvExecutor", "MultiprocExecutor", "WorkerError", "create_runner"]
logger = logging.getLogger(__name__)

# Token of the executor whose process group is live (one per process).
_group_owner: object | None = None


def create_runner(config: EngineConfig) -> ModelRunner | TensorParallelExecutor:
    """A ModelRunner at TP=1; at TP>1 the executor for this launch (spawned or torchrun).

    Under torchrun, ranks other than 0 serve steps here until rank 0 stops, then exit the process
    (`SystemExit(0)`): every node runs the same command and only rank 0 goes on to serve.
    """
    tp = config.tensor_parallel_size
    if tp == 1:
        return ModelRunner(config)
    launch = env_launch()
    if launch is None:
        return MultiprocExecutor(config)
    rank, world, local_rank = launch
    if world != tp:
        raise ValueError(
            f"launched with WORLD_SIZE={world} but tensor_parallel_size={tp}: start one process "
            "per tensor-parallel rank (torchrun --nnodes * --nproc-per-node must equal it)"
        )
    if rank == 0:
        return EnvExecutor(config, local_rank)
    run_env_worker(config, rank, world, local_rank)
    raise SystemExit(0)


def _release(
    group: WorkerGroup | None, token: object, threads: int | None,
    closing: threading.Event | None = None,
) -> None:
    """Stop the workers and leave the process group; safe to call at exit or from the GC."""
    if closing is not None:
        closing.set()  # workers exiting now is expected: the NCCL watcher must not react
    try:
        if group is not None:
            group.stop()
        elif _group_owner is token and dist.is_initialized():
            broadcast_object(None)  # torchrun workers leave their step loop
    except Exception:  # noqa: BLE001 - best effort: peers may already be gone
        logger.debug("tensor-parallel peers did not take the stop message", exc_info=True)
    finally:
        _drop_group(token)
        if threads is not None:
            torch.set_num_threads(threads)


def _drop_group(token: object) -> None:
    """Leave the process group without messaging peers (they may be gone or stuck)."""
    global _group_owner
    if _group_owner is token:
        _group_owner = None
        destroy_tensor_parallel()


def _claim_group() -> object:
    """Reserve this process's one process group for a new executor."""
    global _group_owner
    if dist.is_initialized() and _group_owner is not None:
        gc.collect()  # an engine nobody references any more releases its group when collected
    if dist.is_initialized():
        raise ValueError(
            "a tensor-parallel engine (or another torch.distributed user) already holds this "
            "process's process group; call engine.shutdown() on the previous engine first"
        )
    _group_owner = token = object()
    return token


class TensorParallelExecutor:
    """Rank 0's side. The engine uses it exactly like a ModelRunner."""

    runner: ModelRunner

    def __init__(self) -> None:
        self._error: WorkerError | None = None
        self._closed = False

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def batch(self):
        return self.runner.batch

    def launch(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Send the step to every rank, run rank 0's forward and sample. Tensor-parallel steps
        are synchronous (the other ranks need each step's tokens on the host): the result is
        read here, inside the error handling."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise WorkerError("the tensor-parallel engine was shut down")
        if prev is not None:
            raise RuntimeError("tensor-parallel steps cannot overlap (async scheduling is off)")
        try:
            step = self.runner.prepare(sched)
            self._send(step)
            inflight = self.runner.launch_prepared(step, sched)
            inflight.result()
            self._check_after_step()
            return inflight
        except BaseException as exc:
            # Whatever happened (even Ctrl-C), the ranks may now be out of lock-step.
            if isinstance(exc, WorkerError):
                self._error = exc
            elif isinstance(exc, Exception):
                self._error = self._explain(exc, "during a step")
            else:
                self._error = WorkerError("a tensor-parallel step was interrupted; start a new engine")
            logger.error("%s", self._error)
            self._abandon()
            if self._error is exc or not isinstance(exc, Exception):
                raise
            raise self._error from exc

    def shutdown(self) -> None:
        """Stop the other ranks and leave the process group (idempotent)."""
        self._closed = True
        self._finalizer()

    def _abandon(self) -> None:
        """After a failure: stop what is left without waiting on peers that may be stuck."""
        self.shutdown()

    def _send(self, step: StepArrays) -> None:
        raise NotImplementedError

    def _check_after_step(self) -> None:
        """Raise WorkerError if a peer was lost while the step ran (its results are void)."""

    def _explain(self, exc: BaseException, when: str) -> WorkerError:
        raise NotImplementedError


class MultiprocExecutor(TensorParallelExecutor):
    """Ranks 1..N-1 as spawned processes on this host; gloo on CPU, NCCL on CUDA."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        tp = config.tensor_parallel_size
        device = config.model.torch_device
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + tp:
            raise ValueError(
                f"tensor_parallel_size {tp} needs {tp} GPUs from {device}, "
                f"found {torch.cuda.device_count()}"
            )
        token = _claim_group()
        # CPU ranks on one host share its cores: each gets its share (rank 0's is restored at
        # shutdown).
        threads = torch.get_num_threads() if device.type == "cpu" else None
        per_rank = max(1, threads // tp) if threads is not None else None
        store = dist.TCPStore(
            "127.0.0.1", 0, tp, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=timeout_seconds()),
        )
        self.workers = WorkerGroup.spawn(config, store.port, per_rank)
        self._closing, self._lost = threading.Event(), threading.Event()
        self._finalizer = weakref.finalize(self, _release, self.workers, token, threads, self._closing)
        try:
            if per_rank is not None:
                torch.set_num_threads(per_rank)
            self.workers.wait_for("started", timeout_seconds())
            init_tensor_parallel(0, tp, 0, device, store=store)
            self.runner = ModelRunner(config)
            self.workers.wait_for("ready", timeout_seconds())
        except Exception as exc:
            error = exc if isinstance(exc, (WorkerError, ValueError)) else self._explain(exc, "during start-up")
            self._abandon()
            if error is exc:
                raise
            raise error from exc
        if dist.get_backend() == "nccl":
            threading.Thread(
                target=_watch_nccl_workers, args=(self.workers.procs, self._closing, self._lost),
                name="llmserve-tp-watch", daemon=True,
            ).start()
        logger.info("tensor parallelism: %d ranks on %s (%s)", tp, device, dist.get_backend())

    def _send(self, step: StepArrays) -> None:
        self.workers.send(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))

    def _check_after_step(self) -> None:
        if self._lost.is_set():
            raise self.workers.explain(RuntimeError("NCCL process group aborted"), "during a step")

    def _explain(self, exc: BaseException, when: str) -> WorkerError:
        return self.workers.explain(exc, when)

    def _abandon(self) -> None:
        self.workers.stop(timeout=1.0)
        self.shutdown()


class EnvExecutor(TensorParallelExecutor):
    """Rank 0 of a torchrun launch; ranks 1..N-1 (this node or others) serve broadcast steps."""

    def __init__(self, config: EngineConfig, local_rank: int) -> None:
        super().__init__()
        token = _claim_group()
        self._token = token
        self._finalizer = weakref.finalize(self, _release, None, token, None)
        world = config.tensor_parallel_size
        try:
            init_tensor_parallel(0, world, local_rank, config.model.torch_device)
            self.runner = ModelRunner(config)
        except BaseException:
            self._closed = True
            self._finalizer.detach()
            _drop_group(token)
            raise
        logger.info("tensor parallelism: rank 0 of %d (env:// rendezvous)", world)

    def _send(self, step: StepArrays) -> None:
        broadcast_object(step)

    def _explain(self, exc: BaseException, when: str) -> WorkerError:
        return WorkerError(
            f"a tensor-parallel collective failed {when}: {exc}; a peer rank died or timed out "
            "(see its log); "
            "the engine cannot continue and fails its requests"
        )

    def _abandon(self) -> None:
        # The group is broken: do not try to broadcast a stop message on it.
        self._closed = True
        self._finalizer.detach()
        _drop_group(self._token)


def _watch_nccl_workers(procs: list, closing: threading.Event, lost: threading.Event) -> None:
    """Abort the NCCL group as soon as a worker process exits unexpectedly.

    gloo fails a collective by itself when a peer's socket closes; NCCL kernels would wait for
    the dead peer until the watchdog timeout. Aborting the communicators makes rank 0's pending
    collectives fail now, and `lost` voids the step's results.
    """
    wait([p.sentinel for p in procs])
    if closing.is_set():
        return
    lost.set()
    logger.error("a tensor-parallel worker exited; aborting the NCCL process group")
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - experimental API; the collective timeout still applies
        logger.exception("could not abort the NCCL process group")
