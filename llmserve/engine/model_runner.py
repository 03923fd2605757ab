"""Model runner: owns the weights and the KV cache, turns a scheduled step into tensors, runs the
model and samples.

One flat batch per step: the scheduled requests' new tokens are concatenated. The block tables
live in a persistent batch (`InputBatch`: one row per running request, updated from the
scheduler's deltas), so positions, slot mapping and tables are a few numpy gathers per step
(`StepArrays`); on CUDA they travel through pinned staging buffers allocated once. The arrays are
also what tensor-parallel workers receive, so every rank builds the same tensors.

`launch` runs the forward and starts sampling without waiting for the device: it returns an
`InFlightStep` whose `result()` reads the sampled tokens. With async scheduling the engine
launches step N+1 before reading step N, and the tokens step N sampled become step N+1's inputs
on the device (`StepArrays.from_device_*`) without a round trip through the host.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.attention.backends import get_attention_backend
from llmserve.attention.metadata import AttentionMetadata, OutputRows, forward_context
from llmserve.attention.windows import kv_release_window
from llmserve.config import EngineConfig
from llmserve.distributed.communication import all_reduce_min
from llmserve.distributed.parallel_state import get_tp_world_size, rank_device
from llmserve.engine.host_staging import HostStaging
from llmserve.engine.input_batch import InputBatch, StepArrays
from llmserve.engine.request import Request
from llmserve.engine.sampler import PendingSample, Sampler, SamplerOutput
from llmserve.engine.sampling_logprobs import (
    PendingPromptLogprobs,
    PromptLogprobSpan,
    prompt_logprob_targets,
)
from llmserve.engine.scheduler import SchedulerOutput
from llmserve.kernels import cpu_huge_pages
from llmserve.kernels.cpu_allocator import keep_freed_memory
from llmserve.layers.attention import Attention
from llmserve.models.cpu_fast_path import long_lived_tensors, optimize_for_cpu
from llmserve.models.loader import load_model
from llmserve.structured.masks import start_grammar_masks

logger = logging.getLogger(__name__)
# prompt_logprob_targets' result: (token rows, prompt tokens they score, spans).
PromptRows = tuple[list[int], list[int], list[PromptLogprobSpan]]


@dataclass
class InFlightStep:
    """A launched step: its schedule, the requests that sample (in order) and their samples."""

    sched: SchedulerOutput
    sampling: list[Request]
    pending: PendingSample | None
    # request id -> row of `pending.token_ids`, for the next step's device-side inputs.
    sample_row_of: dict[str, int]
    # Prompt logprobs this step scored, if any request asked (written into the requests).
    prompt_logprobs: PendingPromptLogprobs | None = None
    _result: SamplerOutput | None = None

    def result(self) -> SamplerOutput | None:
        """Wait for the device and read the sampled tokens (and logprobs); once. Prompt
        logprobs the step scored are stored into their requests first."""
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.write()
        if self._result is None and self.pending is not None:
            self._result = self.pending.to_host()
        return self._result


class ModelRunner:
    """Owns this rank's shard of the weights and of the KV cache (all of it at TP=1)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tp_size = get_tp_world_size()
        self.device = rank_device(config.model.torch_device)
        self.dtype = config.model.torch_dtype
        self.block_size = config.cache.block_size
        hf_config = config.model.hf_config
        torch.manual_seed(config.model.seed)
        self.model = load_model(config.model.model, hf_config, self.dtype, self.device)
        # On CPU in fp32: the small ops between the matmuls as native kernels (a no-op elsewhere).
        optimize_for_cpu(self.model, eager=config.enforce_eager)
        if self.device.type == "cpu":  # weights on huge pages (see cpu_huge_pages)
            cpu_huge_pages.advise(long_lived_tensors(self.model))
        self.vocab_size = int(self.model.config["vocab_size"])
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._decide_num_blocks()
        self._allocate_kv_cache(get_attention_backend(config.resolved_attention_backend))
        self.sampler = Sampler()
        max_blocks = -(-config.max_model_len // self.block_size)
        self.batch = InputBatch(config.scheduler.max_num_seqs, max_blocks, self.block_size,
                                kv_release_window(hf_config))
        self.staging = HostStaging(self.device)
        if self.device.type == "cpu":
            # After loading: the weights and the KV pool stay where they are, and the heap
            # keeps only what steps allocate and free (see cpu_allocator).
            keep_freed_memory()
        self.graphs = None
        # Graph capture needs a backend that never syncs with the host in a decode batch.
        # NOTE: decode graphs are captured at TP=1 only; capturing collectives is not done yet.
        if (
            self.device.type == "cuda"
            and self.tp_size == 1
            and not config.enforce_eager
            and config.resolved_attention_backend == "triton"
        ):
            from llmserve.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model, self.device, config.scheduler.max_num_seqs, max_blocks,
                config.max_model_len,
            )

    # -- KV cache --------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        layer = self.attn_layers[0]
        per_token = 2 * len(self.attn_layers) * layer.num_kv_heads * layer.head_dim
        return per_token * self.block_size * self.dtype.itemsize

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Keep room for activations of the largest step and the sampler's vocab-wide tensors.
            cfg = self.model.config
            activations = self.config.scheduler.max_num_batched_tokens * (
                4 * cfg["hidden_size"] + 2 * cfg["intermediate_size"]
            ) * self.dtype.itemsize * 2
            logits = self.config.scheduler.max_num_seqs * self.vocab_size * 4 * 4
            budget = free - (1 - cache.memory_fraction) * total - activations - logits
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            # CPU ranks share the host's memory: split the cap between them.
            budget = min(cache.memory_fraction * available, cache.cpu_kv_cache_gib * 2**30) / self.tp_size
        num_blocks = int(budget // self._block_bytes())
        # More blocks than every sequence at full length (plus as many again for the prefix
        # cache) cannot help.
        per_seq = -(-self.config.max_model_len // self.block_size)
        num_blocks = min(num_blocks, 2 * per_seq * self.config.scheduler.max_num_seqs)
        # Every rank holds the same block ids (each for its own KV heads): agree on the smallest pool.
        num_blocks = all_reduce_min(num_blocks, self.device)
        if num_blocks < 1:
            raise ValueError("not enough memory for even one KV-cache block; lower the load or free memory")
        return num_blocks

    def _allocate_kv_cache(self, backend) -> None:
        layer = self.attn_layers[0]
        shape = (2, len(self.attn_layers), self.num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        if self.device.type == "cpu":  # advised while untouched: its pages fault in huge
            self.kv_cache = cpu_huge_pages.advise_before_fill(torch.empty(shape, dtype=self.dtype))
            self.kv_cache.zero_()
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attn_layers):
            attn.k_cache = self.kv_cache[0, i]
            attn.v_cache = self.kv_cache[1, i]
            attn.backend = backend
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_blocks, self.block_size, self.kv_cache.numel() * self.dtype.itemsize / 2**20,
        )

    # -- one step --------------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> StepArrays:
        """Mirror the scheduler's deltas into the persistent batch and flatten the step."""
        rows = self.batch.update(sched)
        return self.batch.build(sched, rows, prev.sample_row_of if prev is not None else None)

    def launch(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Run one step and start sampling; nothing here waits for the device."""
        step = self.prepare(sched, prev)
        return self.launch_prepared(step, sched, prev)

    @torch.inference_mode()
    def launch_prepared(self, step: StepArrays, sched: SchedulerOutput | None = None,
                        prev: InFlightStep | None = None) -> InFlightStep:
        """Run a prepared step. Tensor-parallel workers pass no `sched` and sample nothing:
        they run the same forward (and their share of the LM head) in lock-step with rank 0."""
        input_ids, positions, meta = self._tensors(step, prev)
        # Grammar masks are filled on the host (a worker thread) while the model runs.
        masks = None if sched is None else start_grammar_masks(
            [sched.scheduled[i][0] for i in sched.sample_indices], self.device)
        prompt_rows = self._prompt_rows(step, sched)
        if self.graphs is not None and self.graphs.can_run(meta, step.batch_size):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            meta.output_rows = self._output_rows(step, prompt_rows)
            with forward_context(meta):
                hidden = self.model(input_ids, positions)
        prompt_lp = self._score_prompts(hidden, prompt_rows)
        if not len(step.sample_rows):
            return InFlightStep(sched, [], None, {}, prompt_lp)
        if not step.all_rows_sample_last_token and meta.output_rows is None:
            hidden = hidden.index_select(0, self.staging.put("sample_index", step.sample_token_index))
        sampling = [] if sched is None else [sched.scheduled[i][0] for i in sched.sample_indices]
        tokens = self._greedy_tokens(hidden, sampling, masks)
        if tokens is not None:
            pending = PendingSample(tokens, tokens, [], [])
        else:
            logits = self.model.compute_logits(hidden)  # every rank: the LM head is sharded
            if sched is None or logits is None:  # a tensor-parallel worker
                return InFlightStep(sched, [], None, {})
            pending = self.sampler.sample(logits, sampling, masks.result() if masks else None)
        return InFlightStep(sched, sampling, pending,
                            {r.request_id: j for j, r in enumerate(sampling)}, prompt_lp)

    def _greedy_tokens(self, hidden: torch.Tensor, sampling: list[Request],
                       masks: object | None) -> torch.Tensor | None:
        """The batch's tokens straight from the model when every row is plain greedy and the
        model finds argmaxes without the full logits (CPU: `cpu_greedy`); else None."""
        greedy = getattr(self.model, "greedy_tokens", None)
        if greedy is None or self.tp_size > 1 or not self.sampler.plain_greedy(sampling, masks):
            return None
        return greedy(hidden)

    def _output_rows(self, step: StepArrays, prompt_rows: PromptRows | None
                     ) -> OutputRows | None:
        """The sampled rows, for a model that can skip the rest of its last layer; None when
        every row's hidden state is read anyway (all decodes, or prompt logprobs to score)."""
        if (not getattr(self.model, "prunes_output_rows", False) or self.tp_size > 1
                or step.all_rows_sample_last_token or prompt_rows is not None):
            return None
        put = self.staging.put
        return OutputRows(put("output_tokens", step.sample_token_index),
                          put("output_seqs", step.sample_rows))

    def _prompt_rows(self, step: StepArrays, sched: SchedulerOutput | None) -> PromptRows | None:
        """The rows of this step that score prompt tokens (`prompt_logprob_targets`), or None
        when no request asks. (The engine refuses prompt_logprobs under tensor parallelism:
        the sharded LM head would need every rank to score the same rows.)"""
        if sched is None or self.tp_size > 1:
            return None
        found = prompt_logprob_targets(sched.scheduled, sched.starts, step.query_start_loc)
        return found if found[0] else None

    def _score_prompts(self, hidden: torch.Tensor, prompt_rows: PromptRows | None
                       ) -> PendingPromptLogprobs | None:
        """Logprobs of the prompt tokens in this step, for the requests that ask for them."""
        if prompt_rows is None:
            return None
        rows, targets, spans = prompt_rows
        return PendingPromptLogprobs(hidden, self.model.compute_logits, self.vocab_size, rows,
                                     targets, spans)

    def _tensors(self, step: StepArrays, prev: InFlightStep | None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        put = self.staging.put
        self.staging.next_step()
        input_ids = put("input_ids", step.input_ids)
        if step.from_device_dst is not None:
            if prev is None or prev.pending is None:
                raise RuntimeError("a step needs tokens from a previous step that was not launched")
            src = put("from_device_src", step.from_device_src)
            input_ids.index_copy_(0, put("from_device_dst", step.from_device_dst),
                                  prev.pending.token_ids.index_select(0, src))
        meta = AttentionMetadata(
            slot_mapping=put("slot_mapping", step.slot_mapping),
            query_start_loc=put("query_start_loc", step.query_start_loc),
            seq_lens=put("seq_lens", step.seq_lens),
            block_tables=put("block_tables", step.block_tables),
            max_query_len=1 if step.num_decode_tokens == step.batch_size
            else int(np.diff(step.query_start_loc).max()),
            max_seq_len=int(step.seq_lens.max()),
            num_decode_tokens=step.num_decode_tokens,
        )
        return input_ids, put("positions", step.positions), meta

    def shutdown(self) -> None:
        """Nothing to stop in a single process (tensor-parallel executors stop their workers)."""
