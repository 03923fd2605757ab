"""The OpenAI request layer: a chat / completion body → engine inputs, engine outputs → bodies.

Every front end goes through here: the HTTP routes (with bodies FastAPI already validated), the
gRPC servicer and batch jobs (with raw JSON bodies, via `parse_body`). So all of them accept,
refuse, tokenize, sample and answer alike. The answers are built by the request's `Reply`
(`replies.py`); stream deltas are tracked once (`deltas.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.openai.constraints import (
    OutputPlan,
    after_reasoning,
    plan_output,
    read_prompt_reasoning,
)
from llmserve.server.openai.deltas import DeltaTracker, RequestAborted
from llmserve.server.openai.errors import APIError, model_not_found, validation_message
from llmserve.server.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from llmserve.server.openai.reasoning import get_reasoning_parser
from llmserve.server.openai.replies import OutputSpec, Reply, usage
from llmserve.server.openai.shapes import ParsedText, PlainText
from llmserve.server.openai.tool_parsers import detect_tool_parser, get_tool_parser

if TYPE_CHECKING:
    from llmserve.tokenizer import Tokenizer

__all__ = ["CHAT_URL", "COMPLETIONS_URL", "APIError", "DeltaTracker", "EngineRequest",
           "ModelView", "Reply", "RequestAborted", "check_model", "parse_body", "prepare",
           "render_chat", "resolve_reasoning_parser", "resolve_tool_call_parser", "usage"]

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OpenAIRequest = ChatCompletionRequest | CompletionRequest
# Whether the engine reports prompt logprobs (echo with logprobs, vLLM's prompt_logprobs).
_PROMPT_LOGPROBS = "prompt_logprobs" in getattr(RequestOutput, "__dataclass_fields__", {})


@dataclass(frozen=True)
class ModelView:
    """What the layer needs to know of the served model."""

    tokenizer: Tokenizer
    served_names: list[str]
    max_model_len: int
    tool_call_parser: str | None = None  # parses `tools` calls; None: tools are refused
    reasoning_parser: str | None = None  # splits out `reasoning_content`; None: no split

    @classmethod
    def build(cls, tokenizer: Tokenizer, served_names: list[str], max_model_len: int,
              tool_call_parser: str | None = None, reasoning_parser: str | None = None
              ) -> ModelView:
        """A view with checked parser names; no tool-call parser named: detected from the
        chat template (None when it shows no known format). ValueError for unknown names."""
        return cls(tokenizer, list(served_names), max_model_len,
                   resolve_tool_call_parser(tool_call_parser, tokenizer),
                   resolve_reasoning_parser(reasoning_parser))


def resolve_tool_call_parser(name: str | None, tokenizer: Tokenizer) -> str | None:
    """`name` checked, or the parser the chat template's format implies."""
    if name is None:
        return detect_tool_parser(getattr(tokenizer, "chat_template", None))
    get_tool_parser(name)
    return name


def resolve_reasoning_parser(name: str | None) -> str | None:
    if name is not None:
        get_reasoning_parser(name)
    return name


@dataclass
class EngineRequest:
    """A valid body as the engine takes it: one engine prompt per completion prompt."""

    request: OpenAIRequest
    prompts: list[dict]  # {"prompt_token_ids": [...]} each (plus "prompt": text if any)
    params: SamplingParams
    model: str  # the served name to report
    output: OutputSpec
    # Extra keys for the engine's request info (read by the trace ledger).
    extra_info: dict[str, Any]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p["prompt_token_ids"]) for p in self.prompts)

    def info(self, endpoint: str, **extra: Any) -> dict[str, Any]:
        """The info dict handed to `engine.add_request` with each prompt."""
        req = self.request
        # OpenAI's safety_identifier names the end user as `user` did; the ledger hashes it.
        user = req.user or (req.model_extra or {}).get("safety_identifier")
        return {"model": self.model, "endpoint": endpoint, "user": user,
                "metadata": req.metadata, **self.extra_info, **extra}

    def reply(self, request_id: str, created: int, include_usage: bool = False) -> Reply:
        return Reply(self.output, request_id, created, self.model, include_usage)


def check_model(name: str | None, served_names: list[str]) -> str:
    """The name to report for a request's `model`; 404 for a model this server lacks."""
    if name is None:
        return served_names[0]
    if name in served_names:
        return name
    raise model_not_found(name)


def parse_body(url: str, body: Any, view: ModelView) -> EngineRequest:
    """Validate a raw JSON body exactly as POST `url` would, and prepare it.

    Raises APIError with the HTTP status: 400, or 404 for an unknown model.
    """
    model_cls = ChatCompletionRequest if url == CHAT_URL else CompletionRequest
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param=param) from None
    model = check_model(req.model, view.served_names)
    try:
        prepared = prepare(req, view, model)
        _check_context(prepared.prompts, prepared.params, view.max_model_len)
    except ValueError as exc:
        raise APIError(400, str(exc)[:1000]) from None
    return prepared


def prepare(req: OpenAIRequest, view: ModelView, model: str) -> EngineRequest:
    """Engine prompts, sampling params and reply spec of a validated body (ValueError: 400)."""
    tokenizer = view.tokenizer
    plan = plan_output(req, tokenizer, view.tool_call_parser, view.reasoning_parser)
    if isinstance(req, ChatCompletionRequest):
        return _prepare_chat(req, view, model, plan)
    echo_logprobs = req.echo and req.logprobs is not None
    _check_prompt_logprobs(req, echo_logprobs)
    prompt_top = _max(req.prompt_logprobs, req.logprobs if echo_logprobs else None)
    params = sampling_params(req, req.max_tokens, req.logprobs, plan, prompt_top)
    texts = req.prompts()
    prompts = [_completion_prompt(p, tokenizer) for p in texts]
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in texts]
    spec = OutputSpec(chat=False, n=req.n, top_logprobs=req.logprobs, tokenizer=tokenizer,
                      echo=echo, echo_logprobs=echo_logprobs,
                      prompt_logprobs=req.prompt_logprobs is not None)
    return EngineRequest(req, prompts, params, model, spec, _info(plan))


def _prepare_chat(req: ChatCompletionRequest, view: ModelView, model: str,
                  plan: OutputPlan) -> EngineRequest:
    tokenizer = view.tokenizer
    _check_prompt_logprobs(req, False)
    prompt_ids = render_chat(tokenizer, req.messages, req.add_generation_prompt,
                             **plan.template_kwargs)
    read_prompt_reasoning(plan, tokenizer, prompt_ids)
    after_reasoning(plan, tokenizer, prompt_ids)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, req.completion_limit, top, plan, req.prompt_logprobs)
    shape = PlainText
    if plan.tool_parser is not None or plan.reasoning_parser is not None:
        tools, reasoning = plan.tool_parser, plan.reasoning_parser

        def shape() -> ParsedText:
            return ParsedText(reasoning() if reasoning else None, tools() if tools else None)

    spec = OutputSpec(chat=True, n=req.n, top_logprobs=top, tokenizer=tokenizer, shape=shape,
                      prompt_logprobs=req.prompt_logprobs is not None)
    return EngineRequest(req, [{"prompt_token_ids": prompt_ids}], params, model, spec,
                         _info(plan))


def _info(plan: OutputPlan) -> dict[str, Any]:
    info: dict[str, Any] = {"response_format": plan.kind}
    if plan.tool_parser is not None:
        info["tool_call_counter"] = plan.count_tool_calls
    return info


def _check_prompt_logprobs(req: OpenAIRequest, echo_logprobs: bool) -> None:
    wanted = req.prompt_logprobs is not None or echo_logprobs
    if wanted and not _PROMPT_LOGPROBS:
        raise ValueError("prompt_logprobs (and echo with logprobs) is not supported by this "
                         "engine")
    if req.prompt_logprobs is not None and req.stream:
        raise ValueError("prompt_logprobs is not supported with stream")


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage],
                add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
    """The prompt token ids of a conversation, rendered by the model's chat template."""
    conversation = [m.as_template_message() for m in messages]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    plan: OutputPlan | None = None, prompt_logprobs: int | None = None
                    ) -> SamplingParams:
    """SamplingParams from the request's fields; ValueError (400) for bad combinations."""
    plan = plan or OutputPlan()
    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens and not plan.keep_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured_outputs=plan.structured,
        logit_bias=plan.logit_bias,
        prompt_logprobs=prompt_logprobs,
    )


def _completion_prompt(prompt: str | list[int], tokenizer: Tokenizer) -> dict:
    # Text is tokenized here, in the server's process, so the engine's step loop does not pay
    # for it (the engine still checks the ids).
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return {"prompt": prompt, "prompt_token_ids": tokenizer.encode(prompt)}
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
