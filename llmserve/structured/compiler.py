"""Grammar compilation off the step loop: a thread pool and an LRU cache keyed by the spec."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from llmserve.structured.backend import CompiledGrammar, GrammarBackend
from llmserve.structured.spec import GrammarSpec

DEFAULT_CACHE_SIZE = 256


class GrammarCompiler:
    """`submit(spec)` returns a future of the compiled grammar.

    The cache holds futures, so requests with the same (kind, spec) arriving while it compiles
    share one compilation; a cached spec's future is already done. Failed compilations are not
    cached (the next request retries and gets the same clear error).
    """

    def __init__(self, backend: GrammarBackend, max_workers: int = 2,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="llmserve-grammar")
        self._cache: OrderedDict[GrammarSpec, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def submit(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return future
            self.misses += 1
            future = self._pool.submit(self.backend.compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failed(spec, f))
        return future

    def compiled(self, spec: GrammarSpec) -> bool:
        """True when `spec` compiled successfully before (it is valid, and `submit` is a hit)."""
        with self._lock:
            future = self._cache.get(spec)
        return (future is not None and future.done() and not future.cancelled()
                and future.exception() is None)

    def warm_up(self, task) -> Future:
        """Run `task` on the pool (e.g. building the backend's tokenizer at start-up)."""
        return self._pool.submit(task)

    def _forget_failed(self, spec: GrammarSpec, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._cache.get(spec) is future:
                    del self._cache[spec]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
