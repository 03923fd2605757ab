"""StructuredOutputManager: the engine's side of constrained decoding.

It validates a request's constraint when the request is added, starts its compilation on a
thread pool, holds the request out of the scheduler until its grammar is ready (others run
meanwhile), fails it on a compile error or timeout, and advances each completion's matcher
with the tokens the engine appends.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING

from llmserve.structured.backends import create_backend
from llmserve.structured.compiler import GrammarCompiler
from llmserve.structured.request_grammar import RequestGrammar
from llmserve.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from llmserve.engine.request import Request
    from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 30.0
_IDLE_WAIT_S = 0.01  # how long an otherwise idle step waits for a compilation to finish


class StructuredOutputManager:
    """One per engine: a grammar backend for the engine's tokenizer and model vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, backend: str = "llguidance",
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 max_workers: int = 2) -> None:
        self.backend = create_backend(backend, tokenizer, vocab_size)
        self.compiler = GrammarCompiler(self.backend, max_workers=max_workers)
        self.compile_timeout_s = compile_timeout_s
        self.waiting: list[Request] = []  # added, grammar still compiling
        if hasattr(self.backend, "ll_tokenizer"):  # built once, off the step loop
            self.compiler.warm_up(lambda: self.backend.ll_tokenizer)

    def validate(self, params: SamplingParams) -> GrammarSpec | None:
        """The request's spec, checked by the backend; ValueError naming what is wrong."""
        so = params.structured_outputs
        if so is None:
            return None
        spec = GrammarSpec.from_params(so)
        if not self.compiler.compiled(spec):  # a spec that compiled before is valid
            self.backend.validate(spec)
        return spec

    def admit(self, spec: GrammarSpec, params: SamplingParams,
              children: list[Request]) -> list[Request]:
        """Start compiling (or take the cached grammar); return the children that can be
        scheduled now. The others wait here until `poll` releases them."""
        future = self.compiler.submit(spec)
        deadline = time.monotonic() + self.compile_timeout_s
        after = params.structured_outputs.after_token_ids
        ready = []
        for child in children:
            child.grammar = RequestGrammar(self.backend, future, after, deadline)
            if child.grammar.poll() == "ready":
                ready.append(child)
            else:  # compiling, or failed: `poll` reports it in the next step
                self.waiting.append(child)
        return ready

    def poll(self, idle: bool = False) -> tuple[list[Request], list[Request]]:
        """(requests whose grammar is now ready, requests whose compilation failed or timed
        out). With `idle` (nothing else to run) it first waits briefly for a compilation."""
        if not self.waiting:
            return [], []
        if idle:
            futures = {r.grammar.future for r in self.waiting}
            concurrent.futures.wait(futures, timeout=_IDLE_WAIT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        now = time.monotonic()
        ready, failed, still = [], [], []
        for request in self.waiting:
            state = request.grammar.poll(now)
            (ready if state == "ready" else failed if state == "failed" else still).append(request)
        self.waiting = still
        for request in failed:
            logger.warning("request %s: %s", request.request_id, request.grammar.error)
        return ready, failed

    def drop(self, request_ids: set[str]) -> list[Request]:
        """Take requests still waiting for their grammar out (an abort); return them."""
        dropped = [r for r in self.waiting if r.request_id in request_ids]
        if dropped:
            self.waiting = [r for r in self.waiting if r.request_id not in request_ids]
        return dropped

    def advance(self, changed: list[Request]) -> list[Request]:
        """Feed the new output tokens to each changed request's matcher; return the requests
        whose token the grammar refused (it cannot happen under the mask; a failed matcher
        ends its request rather than produce unconstrained text)."""
        violated = []
        for request in changed:
            grammar = request.grammar
            if grammar is not None and not grammar.advance(request.output_token_ids):
                logger.warning("request %s: %s", request.request_id, grammar.error)
                violated.append(request)
        return violated

    @staticmethod
    def needs_sync(request: Request) -> bool:
        """Whether the request's next mask depends on the token a step in flight samples."""
        grammar = request.grammar
        return grammar is not None and grammar.error is None and not grammar.terminated

    def shutdown(self) -> None:
        self.compiler.shutdown()
