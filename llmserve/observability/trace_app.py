"""Installing the trace ledger into an OpenAI app built by ``create_app``.

The recorder becomes an engine observer, ``TraceMiddleware`` goes innermost (inside the gateway,
so requests refused for auth, size or drain get no row), cost counters join the app's /metrics
registry, and the app's shutdown hooks close the ledger after the engine stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmserve.observability.ledger import TraceLedger
from llmserve.observability.recorder import TraceRecorder
from llmserve.observability.trace_options import TraceOptions

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmserve.engine.async_engine import AsyncEngine


def install_trace_ledger(app: FastAPI, engine: AsyncEngine,
                         options: TraceOptions | None) -> TraceRecorder | None:
    """Attach the trace ledger to ``app`` (before it starts serving); None when it is off."""
    if options is None:
        return None
    from starlette.middleware import Middleware

    from llmserve import __version__
    from llmserve.models.version import compute_model_version
    from llmserve.observability.pricing import load_pricing
    from llmserve.observability.tracing import TraceMiddleware, otlp_exporter

    if app.middleware_stack is not None:
        raise RuntimeError("install_trace_ledger must run before the app starts serving")
    hooks = app.state.shutdown_hooks  # set by create_app: run after the engine stopped
    ctx = app.state.ctx
    pricing = load_pricing(options.pricing) if options.pricing else None
    exporter = otlp_exporter(options.otlp_endpoint) if options.otlp_endpoint else None
    recorder = TraceRecorder(
        TraceLedger(options.trace_db), engine, model_name=ctx.model_name,
        model_version=compute_model_version(engine.engine.config.model.model),
        pricing=pricing, chat_template_hash=engine.tokenizer.chat_template_hash,
        log_prompts=options.log_prompts, span_exporter=exporter,
        endpoint_version=f"llmserve-{__version__}/openai-v1", registry=ctx.registry)
    engine.add_observer(recorder)
    app.user_middleware.append(Middleware(TraceMiddleware, recorder=recorder))
    hooks.append(recorder.close)
    app.state.trace_recorder = recorder
    return recorder
