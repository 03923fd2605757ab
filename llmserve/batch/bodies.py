"""One batch line's body as engine inputs, and engine outputs as the line's response.

Bodies are validated by the HTTP server's own pydantic models and turned into SamplingParams by
its own conversion, and responses are built by its own chat / completion response builders, so
a batch line behaves exactly like the same body POSTed to the server.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llmserve.server.openai import chat as chat_api
from llmserve.server.openai import completions as completion_api
from llmserve.server.openai.errors import _validation_message, error_body
from llmserve.server.openai.protocol import ChatCompletionRequest, CompletionRequest
from llmserve.server.openai.serving import sampling_params

if TYPE_CHECKING:
    from llmserve.batch.lines import BatchLine
    from llmserve.outputs import RequestOutput
    from llmserve.sampling_params import SamplingParams
    from llmserve.tokenizer import Tokenizer

CHAT_URL = "/v1/chat/completions"
# Engine priority of batch lines: higher numbers are served later (vLLM's convention).
BATCH_PRIORITY = 10


@dataclass
class Prepared:
    """A valid line, ready for the engine: one engine prompt per completion prompt."""

    line: BatchLine
    request: ChatCompletionRequest | CompletionRequest
    prompts: list[dict]  # {"prompt_token_ids": [...]} each
    params: SamplingParams
    model: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def is_chat(self) -> bool:
        return self.line.url == CHAT_URL

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p["prompt_token_ids"]) for p in self.prompts)


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


class BodyError(ValueError):
    """A request body the HTTP API would refuse, with the status it would answer."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass
class ParsedBody:
    """A valid request body: the validated model, engine prompts and sampling params."""

    request: ChatCompletionRequest | CompletionRequest
    prompts: list[dict]  # {"prompt_token_ids": [...]} each
    params: SamplingParams
    model: str  # the served name to report


def parse_body(url: str, body: dict, tokenizer: Tokenizer, served_names: list[str],
               max_model_len: int) -> ParsedBody:
    """Validate `body` exactly as POST `url` would and tokenize its prompt(s).

    Raises BodyError with the HTTP status (400, or 404 for an unknown model).
    """
    model_cls = ChatCompletionRequest if url == CHAT_URL else CompletionRequest
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise BodyError(400, message, param) from None
    if req.model is not None and req.model not in served_names:
        raise BodyError(404, f"The model '{req.model[:64]}' does not exist", "model",
                        "model_not_found")
    try:
        if isinstance(req, ChatCompletionRequest):
            top = (req.top_logprobs or 0) if req.logprobs else None
            params = sampling_params(req, req.completion_limit, top)
            prompts = [_chat_prompt(req, tokenizer)]
        else:
            params = sampling_params(req, req.max_tokens, req.logprobs)
            prompts = [_completion_prompt(p, tokenizer) for p in req.prompts()]
        _check_context(prompts, params, max_model_len)
    except ValueError as exc:
        raise BodyError(400, str(exc)[:1000]) from None
    return ParsedBody(req, prompts, params, served_names[0])


def prepare(line: BatchLine, tokenizer: Tokenizer, served_names: list[str],
            max_model_len: int) -> Prepared | Failed:
    """A batch line ready to run, or the error response it gets instead."""
    if line.body.get("stream"):
        return Failed(line, 400, "stream is not supported in batch requests", "stream")
    try:
        parsed = parse_body(line.url, line.body, tokenizer, served_names, max_model_len)
    except BodyError as exc:
        return Failed(line, exc.status, exc.message, exc.param, exc.code)
    return Prepared(line, parsed.request, parsed.prompts, parsed.params, parsed.model)


def _chat_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> dict:
    conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = tokenizer.apply_chat_template(conversation,
                                         add_generation_prompt=req.add_generation_prompt)
    return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def _completion_prompt(prompt: str | list[int], tokenizer: Tokenizer) -> dict:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return {"prompt_token_ids": tokenizer.encode(prompt)}
    return {"prompt_token_ids": list(prompt)}


def _check_context(prompts: list[dict], params: SamplingParams, max_model_len: int) -> None:
    for p in prompts:
        num = len(p["prompt_token_ids"])
        wanted = num + (params.max_tokens or 1)
        if wanted > max_model_len:
            raise ValueError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {wanted} tokens ({num} in the prompt, {wanted - num} for the "
                "completion). Please reduce the length of the prompt or the completion.")


def response_body(prep: Prepared, outputs: list[RequestOutput], tokenizer: Tokenizer) -> dict:
    """The body the HTTP API would have answered for this line (outputs in prompt order)."""
    created = int(time.time())
    req = prep.request
    if isinstance(req, ChatCompletionRequest):
        top = (req.top_logprobs or 0) if req.logprobs else None
        reply = chat_api._Reply(f"chatcmpl-{prep.request_id}", created, prep.model, top, False,
                                tokenizer)
        return chat_api._response(reply, outputs[0])
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts()]
    reply = completion_api._Reply(f"cmpl-{prep.request_id}", created, prep.model, req.n,
                                  req.logprobs, False, echo, tokenizer)
    return completion_api._response(reply, outputs)


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
