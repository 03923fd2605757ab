"""`/v1/files` and `/v1/batches`: OpenAI's Files and Batch APIs on the HTTP server.

`install_batch_api(app, async_engine, BatchOptions(root=DIR))` adds the routes to an app from
`create_app` and runs the batch worker for the app's lifetime; batches left unfinished by a
previous run of the server resume when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from email import policy
from email.parser import BytesParser
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from llmserve.batch.lines import ENDPOINTS
from llmserve.batch.options import BatchOptions, default_batch_dir
from llmserve.batch.store import BatchStore
from llmserve.batch.worker import BatchWorker
from llmserve.server.openai.errors import APIError

if TYPE_CHECKING:
    from llmserve.engine.async_engine import AsyncEngine

COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_LIST = 100


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No such {kind} object: {object_id[:100]}", param="id",
                    code="not_found")


def _state(request: Request) -> tuple[BatchStore, BatchWorker, BatchOptions]:
    return request.app.state.batch_store, request.app.state.batch_worker, (
        request.app.state.batch_options)


def parse_upload(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes]]:
    """Form fields and the (filename, bytes) of the `file` part of a multipart/form-data body."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise APIError(400, "upload the file as multipart/form-data with fields file and purpose")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    upload = None
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name == "file":
            upload = (part.get_filename() or "upload.jsonl", data)
        elif name:
            fields[name] = data.decode("utf-8", "replace")
    if upload is None:
        raise APIError(400, "missing the 'file' part of the upload", param="file")
    return fields, upload


async def upload_file(request: Request) -> JSONResponse:
    store, _, options = _state(request)
    body = await request.body()
    if len(body) > options.max_file_bytes + 64 * 1024:
        raise APIError(413, f"files are limited to {options.max_file_bytes} bytes")
    fields, (filename, data) = parse_upload(request.headers.get("content-type", ""), body)
    purpose = fields.get("purpose")
    if purpose != "batch":
        raise APIError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
    if not data:
        raise APIError(400, "the file is empty", param="file")
    return JSONResponse(store.add_file(data, filename[:256], purpose))


async def list_files(request: Request, purpose: str | None = None) -> dict:
    store = _state(request)[0]
    return {"object": "list", "data": store.list_files(purpose), "has_more": False}


async def retrieve_file(file_id: str, request: Request) -> dict:
    found = _state(request)[0].get_file(file_id)
    if found is None:
        raise _not_found("File", file_id)
    return found


async def file_content(file_id: str, request: Request) -> Response:
    store = _state(request)[0]
    if store.get_file(file_id) is None:
        raise _not_found("File", file_id)
    data = store.file_path(file_id).read_bytes()
    return Response(data, media_type="application/octet-stream")


async def delete_file(file_id: str, request: Request) -> dict:
    store = _state(request)[0]
    user = store.input_in_use(file_id)
    if user is not None:
        raise APIError(400, f"file {file_id} is the input of running batch {user}", param="id")
    if not store.delete_file(file_id):
        raise _not_found("File", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


async def create_batch(body: CreateBatchRequest, request: Request) -> dict:
    store, worker, _ = _state(request)
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint must be one of {list(ENDPOINTS)}", param="endpoint")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise APIError(400, f"completion_window must be one of {list(COMPLETION_WINDOWS)}",
                       param="completion_window")
    source = store.get_file(body.input_file_id)
    if source is None:
        raise _not_found("File", body.input_file_id)
    if source["purpose"] != "batch":
        raise APIError(400, "the input file's purpose must be 'batch'", param="input_file_id")
    batch = store.add_batch(body.input_file_id, body.endpoint, body.completion_window,
                            COMPLETION_WINDOWS[body.completion_window], body.metadata)
    worker.wake()
    return batch


async def retrieve_batch(batch_id: str, request: Request) -> dict:
    batch = _state(request)[0].get_batch(batch_id)
    if batch is None:
        raise _not_found("Batch", batch_id)
    return batch


async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> dict:
    if not 1 <= limit <= MAX_LIST:
        raise APIError(400, f"limit must be in 1..{MAX_LIST}", param="limit")
    rows = _state(request)[0].list_batches(limit + 1, after)
    page = rows[:limit]
    return {"object": "list", "data": page, "has_more": len(rows) > limit,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


async def cancel_batch(batch_id: str, request: Request) -> dict:
    store, worker, _ = _state(request)
    batch = store.cancel_batch(batch_id)
    if batch is None:
        raise _not_found("Batch", batch_id)
    if batch["status"] not in ("cancelling", "cancelled"):
        raise APIError(409, f"cannot cancel a batch that is {batch['status']}", param="id")
    worker.cancel(batch_id)
    return batch


def batch_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/files", upload_file, methods=["POST"], summary="Upload a file")
    router.add_api_route("/v1/files", list_files, methods=["GET"], summary="List files")
    router.add_api_route("/v1/files/{file_id}", retrieve_file, methods=["GET"])
    router.add_api_route("/v1/files/{file_id}", delete_file, methods=["DELETE"])
    router.add_api_route("/v1/files/{file_id}/content", file_content, methods=["GET"])
    router.add_api_route("/v1/batches", create_batch, methods=["POST"], summary="Create a batch")
    router.add_api_route("/v1/batches", list_batches, methods=["GET"], summary="List batches")
    router.add_api_route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"])
    router.add_api_route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"])
    return router


def install_batch_api(app: FastAPI, engine: AsyncEngine, options: BatchOptions) -> BatchWorker:
    """Add the Files and Batch routes and run the batch worker while the app runs."""
    store = BatchStore(options.root)
    worker = BatchWorker(engine, store, options)
    ctx = getattr(app.state, "ctx", None)
    worker.is_draining = lambda: bool(getattr(ctx, "draining", False))
    if ctx is not None:
        worker.parsers = (ctx.tool_call_parser, ctx.reasoning_parser)
    app.state.batch_store, app.state.batch_worker = store, worker
    app.state.batch_options = options
    app.include_router(batch_router())
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator:
        async with inner(a) as state:
            worker.start()
            try:
                yield state
            finally:
                await worker.stop()
                store.close()

    app.router.lifespan_context = lifespan
    return worker


def install_batch_api_from_args(app: FastAPI, engine: AsyncEngine, args: argparse.Namespace,
                                served_model_names: list[str] | None) -> BatchWorker | None:
    """`install_batch_api` with `--batch-dir`; None when it is 'off'."""
    root = args.batch_dir or default_batch_dir()
    if root.lower() in ("off", "none", "no"):
        return None
    return install_batch_api(app, engine, BatchOptions(root=root,
                                                       served_model_names=served_model_names))
