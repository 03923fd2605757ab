"""A test server: the OpenAI app with the Batch API, on a given port (run as a subprocess).

    python tests/batch/batch_server.py MODEL_DIR ROOT PORT [TRACE_DB]
"""

from __future__ import annotations

import sys

import torch
import uvicorn


def main(model_dir: str, root: str, port: int, trace_db: str | None = None) -> None:
    from llmserve.batch.api import install_batch_api
    from llmserve.batch.options import BatchOptions
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.server.openai.app import create_app

    torch.set_num_threads(1)
    engine = AsyncEngine.from_args(model=model_dir, dtype="float32", num_kv_blocks=256,
                                   max_num_seqs=4)
    app = create_app(engine, api_keys=["test-key"], metrics=False)
    if trace_db:
        from llmserve.observability.trace_app import install_trace_ledger
        from llmserve.observability.trace_options import TraceOptions

        install_trace_ledger(app, engine, TraceOptions(trace_db))
    install_batch_api(app, engine, BatchOptions(root=root))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *(sys.argv[4:5]))
