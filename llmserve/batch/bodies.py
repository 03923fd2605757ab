"""One batch line's body as engine inputs, and engine outputs as the line's response.

Bodies go through the server's request layer (`llmserve.server.openai.layer`), which validates,
tokenizes and answers them, so a batch line behaves exactly like the same body POSTed to the
server.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmserve.server.openai.errors import error_body
from llmserve.server.openai.layer import CHAT_URL, APIError, EngineRequest, ModelView, parse_body

if TYPE_CHECKING:
    from llmserve.batch.lines import BatchLine
    from llmserve.outputs import RequestOutput
    from llmserve.sampling_params import SamplingParams
    from llmserve.server.openai.protocol import ChatCompletionRequest, CompletionRequest
    from llmserve.tokenizer import Tokenizer

__all__ = ["BATCH_PRIORITY", "CHAT_URL", "Failed", "ModelView", "Prepared", "failure_line",
           "prepare", "response_body", "result_line", "usage_of"]

# Engine priority of batch lines: higher numbers are served later (vLLM's convention).
BATCH_PRIORITY = 10


@dataclass
class Prepared:
    """A valid line, ready for the engine: one engine prompt per completion prompt."""

    line: BatchLine
    engine_request: EngineRequest
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def request(self) -> ChatCompletionRequest | CompletionRequest:
        return self.engine_request.request

    @property
    def prompts(self) -> list[dict]:
        return self.engine_request.prompts

    @property
    def params(self) -> SamplingParams:
        return self.engine_request.params

    @property
    def model(self) -> str:
        return self.engine_request.model

    @property
    def is_chat(self) -> bool:
        return self.line.url == CHAT_URL

    @property
    def num_prompt_tokens(self) -> int:
        return self.engine_request.num_prompt_tokens

    def info(self, **extra: Any) -> dict[str, Any]:
        """The engine request info of this line's prompts."""
        return self.engine_request.info(self.line.url, route="batch",
                                        custom_id=self.line.custom_id, **extra)


@dataclass
class Failed:
    """A line whose body is not a valid request: it gets an error response, not a run."""

    line: BatchLine
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def prepare(line: BatchLine, view: ModelView) -> Prepared | Failed:
    """A batch line ready to run, or the error response it gets instead."""
    if line.body.get("stream"):
        return Failed(line, 400, "stream is not supported in batch requests", "stream")
    try:
        parsed = parse_body(line.url, line.body, view)
    except APIError as exc:
        return Failed(line, exc.status, exc.message, exc.param, exc.code)
    return Prepared(line, parsed)


def response_body(prep: Prepared, outputs: list[RequestOutput], tokenizer: Tokenizer) -> dict:
    """The body the HTTP API would have answered for this line (outputs in prompt order)."""
    prefix = "chatcmpl" if prep.is_chat else "cmpl"
    reply = prep.engine_request.reply(f"{prefix}-{prep.request_id}", int(time.time()))
    return reply.response(outputs)


def result_line(custom_id: str, status_code: int, body: dict,
                request_id: str | None = None) -> dict[str, Any]:
    """An output line exactly as OpenAI's batch output files hold them."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id or uuid.uuid4().hex,
                     "body": body},
        "error": None,
    }


def failure_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line for a request that got no response at all (cancelled, expired)."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def usage_of(outputs: list[RequestOutput]) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a line's outputs."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return prompt, completion
