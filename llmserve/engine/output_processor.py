"""Turns engine-side Requests into RequestOutputs: detokenize, stop strings, n > 1 grouping.

Text that could still turn out to be the start of a stop string is held back until it cannot,
so a streaming client never sees part of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.engine.request import Request, RequestStatus
from llmserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from llmserve.tokenizer import IncrementalDetokenizer, Tokenizer


def new_text(detok: IncrementalDetokenizer, tokens: list[int], *, stopped_by_token: bool,
             finished: bool) -> str:
    """The text `tokens` add to a completion. An EOS or stop token ends it and adds no text;
    at the end, held-back bytes of a partial character come out as U+FFFD."""
    if stopped_by_token:
        tokens = tokens[:-1]
    if len(tokens) == 1:  # a decode step: no generator and join for one token
        added = detok.add(tokens[0])
    else:
        added = "".join(detok.add(t) for t in tokens)
    return added + detok.flush() if finished else added


class _Completion:
    """Text state of one child request."""

    def __init__(self, tokenizer: Tokenizer, request: Request, with_text: bool = True) -> None:
        params = request.sampling_params
        self.request = request
        # Without text (see OutputProcessor.frontend_detokenizes) the tokens are only
        # counted: whoever reads the outputs detokenizes them.
        self.detok = IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        ) if with_text else None
        self.text = ""
        self.stops = params.stop
        self.hold_back = max((len(s) for s in self.stops), default=1) - 1
        self.num_processed = 0  # output tokens already folded into `text`

    def update(self) -> bool:
        """Fold new output tokens into the text when stop strings need it; return True if a stop
        string ended it. Without stop strings the text is folded in by `output` instead, so a
        step whose outputs nobody reads (`OutputProcessor.finished_only`) detokenizes nothing."""
        if not self.stops:
            return False
        added = self._fold()
        request = self.request
        if (added is None or request.status == RequestStatus.FINISHED_STOPPED
                or request.num_output_tokens < request.sampling_params.min_tokens):
            return False
        return self._check_stop_strings(len(added))

    def _fold(self) -> str | None:
        """Detokenize the output tokens not yet in `text`, append their text and return it
        (None when there were none, or no detokenizer)."""
        request = self.request
        new_tokens = request.output_token_ids[self.num_processed :]
        self.num_processed = request.num_output_tokens
        if not new_tokens or self.detok is None:
            return None
        added = new_text(self.detok, new_tokens,
                         stopped_by_token=request.status == RequestStatus.FINISHED_STOPPED,
                         finished=request.is_finished)
        self.text += added
        return added

    def _check_stop_strings(self, num_added: int) -> bool:
        start = max(0, len(self.text) - num_added - self.hold_back)
        best, best_stop = -1, None
        for stop in self.stops:
            idx = self.text.find(stop, start)
            if idx >= 0 and (best < 0 or idx < best):
                best, best_stop = idx, stop
        if best < 0:
            return False
        keep = best + len(best_stop) if self.request.sampling_params.include_stop_str_in_output else best
        self.text = self.text[:keep]
        self.request.stop_reason = best_stop
        return True

    def visible_text(self) -> str:
        if self.request.is_finished or not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]

    def output(self) -> CompletionOutput:
        if not self.stops:
            self._fold()
        r = self.request
        return CompletionOutput(
            index=r.index,
            text=self.visible_text(),
            token_ids=list(r.output_token_ids),
            cumulative_logprob=r.cumulative_logprob if r.logprobs is not None else None,
            logprobs=r.logprobs,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            error=r.error,
        )


@dataclass
class _CompletionGroup:
    """One user-visible request: its prompt and the completions of its n child requests."""

    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Completion]
    prompt_logprobs: PromptLogprobs | None = None  # once complete, with decoded tokens

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.children)


class OutputProcessor:
    """Builds the `RequestOutput`s of each step from the requests the scheduler changed.

    Detokenizes each completion incrementally, applies stop strings (holding back text that may
    still become one, and reporting the requests a stop string finished so the engine frees
    them), and folds the n child requests of one user request into one output.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, _CompletionGroup] = {}
        self.by_child: dict[str, _Completion] = {}
        # Set by the engine-core process: the frontend detokenizes, off the step loop
        # (`output_wire.OutputDecoder.detokenize`), so outputs carry tokens and an empty text;
        # only requests with stop strings are still detokenized here (they need it to stop).
        self.frontend_detokenizes = False
        # Set by the offline `LLM` while it runs: it reads finished outputs only, so `process`
        # builds no others (and requests without stop strings are detokenized once, at the end).
        self.finished_only = False

    def add(self, parent_id: str, prompt: str | None, children: list[Request]) -> None:
        with_text = not self.frontend_detokenizes or bool(children[0].sampling_params.stop)
        completions = [_Completion(self.tokenizer, r, with_text) for r in children]
        self.groups[parent_id] = _CompletionGroup(prompt, children[0].prompt_token_ids, completions)
        for c in completions:
            self.by_child[c.request.request_id] = c

    def record_logprobs(self, request: Request, logprobs: dict[int, Logprob] | None) -> None:
        if logprobs is None or request.logprobs is None:
            return
        for token_id, lp in logprobs.items():
            if lp.decoded_token is None:
                lp.decoded_token = self.tokenizer.decode_token(token_id)
        request.logprobs.append(logprobs)
        chosen = logprobs.get(request.output_token_ids[-1])
        if chosen is not None:
            request.cumulative_logprob += chosen.logprob

    def process(self, changed: list[Request]) -> tuple[list[RequestOutput], list[Request]]:
        """Outputs for the parents of `changed`, and the requests a stop string just finished."""
        stopped: list[Request] = []
        parents: dict[str, None] = {}
        for request in changed:
            completion = self.by_child.get(request.request_id)
            if completion is None:
                continue
            if completion.update() and not request.is_finished:
                request.status = RequestStatus.FINISHED_STOPPED
                stopped.append(request)
            parents[request.parent_id] = None
        if self.finished_only:
            return [self.output(pid) for pid in parents if self.groups[pid].finished], stopped
        return [self.output(pid) for pid in parents], stopped

    def output(self, parent_id: str) -> RequestOutput:
        group = self.groups[parent_id]
        first = group.children[0].request
        out = RequestOutput(
            request_id=parent_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=[c.output() for c in group.children],
            finished=group.finished,
            num_cached_tokens=max(0, first.num_cached_tokens),
            metrics=first.metrics,
            num_computed_prefill_tokens=sum(c.request.num_prefill_tokens_run for c in group.children),
            num_computed_decode_tokens=sum(c.request.num_decode_tokens_run for c in group.children),
            prompt_logprobs=self._prompt_logprobs(group),
        )
        if out.finished:
            self.groups.pop(parent_id)
            for c in group.children:
                self.by_child.pop(c.request.request_id, None)
        return out

    def _prompt_logprobs(self, group: _CompletionGroup) -> PromptLogprobs | None:
        """The first completion's prompt logprobs once all are scored, tokens decoded."""
        first = group.children[0].request
        if group.prompt_logprobs is None and first.prompt_logprobs is not None and (
                not first.prompt_logprobs_pending):
            for entry in first.prompt_logprobs:
                for token_id, lp in (entry or {}).items():
                    if lp.decoded_token is None:
                        lp.decoded_token = self.tokenizer.decode_token(token_id)
            group.prompt_logprobs = first.prompt_logprobs
        return group.prompt_logprobs

    def children(self, parent_id: str) -> list[Request]:
        group = self.groups.get(parent_id)
        return [c.request for c in group.children] if group else []
