"""install_trace_ledger: the recorder joins the app innermost and the ledger closes with the app."""

from __future__ import annotations

import pytest
from ledger_server import ENGINE_ARGS

from llmserve.observability.ledger import TraceRecord
from llmserve.observability.trace_app import install_trace_ledger
from llmserve.observability.trace_options import TraceOptions
from llmserve.observability.tracing import TraceMiddleware


def _row(i: int) -> TraceRecord:
    return TraceRecord(trace_id=f"{i:032x}", request_id=f"r{i}", start_time=float(i))


async def test_ledger_is_open_while_serving_and_closed_by_the_apps_shutdown_hook(tiny_checkpoint,
                                                                                   tmp_path):
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.server.openai.app import create_app

    engine = AsyncEngine(LLMEngine.from_args(str(tiny_checkpoint), **ENGINE_ARGS))
    app = create_app(engine)
    assert install_trace_ledger(app, engine, None) is None  # ledger off: nothing installed
    recorder = install_trace_ledger(app, engine, TraceOptions(str(tmp_path / "t.db")))
    assert app.state.shutdown_hooks == [recorder.close]
    assert app.user_middleware[-1].cls is TraceMiddleware  # innermost: inside the gateway
    assert recorder.model_name == "tiny-llama" and recorder.model_version
    async with app.router.lifespan_context(app):
        assert recorder.ledger.submit(_row(1)).result(10) == 1
    with pytest.raises(RuntimeError, match="closed"):
        recorder.ledger.submit(_row(2))
