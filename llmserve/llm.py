"""Offline inference: LLM.generate / LLM.chat over the engine, with a progress bar."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from llmserve.engine.admission import PromptType
from llmserve.engine.llm_engine import LLMEngine
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams

Message = dict[str, object]


class LLM:
    """Generate completions for many prompts at once (continuous batching under the hood).

    Args:
        model: a Hugging Face model directory; None uses the embedded default model (random
            weights, real cl100k tokenizer) so everything runs with no download.
        **engine_args: dtype, block_size, num_kv_blocks, max_num_seqs, max_num_batched_tokens,
            max_model_len, enable_prefix_caching, seed, attention_backend, enforce_eager, ...
    """

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine.from_args(model, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one per prompt"
                )
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
        except ValueError:
            self.engine.abort_request(ids)
            self._drain()
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [
            tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            for conv in conversations
        ]
        token_prompts = [{"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (a no-op with one rank)."""
        self.engine.shutdown()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        num_generated = 0
        outputs = self.engine.outputs
        outputs.finished_only = True  # only finished outputs are read here: build no others
        try:
            with bar:
                while len(results) < len(ids):
                    for out in self.engine.step():
                        if not out.finished:
                            continue
                        results[out.request_id] = out
                        num_generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"output {num_generated / elapsed:.1f} tok/s",
                                            refresh=False)
        finally:
            outputs.finished_only = False
        return [results[i] for i in ids]

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()
