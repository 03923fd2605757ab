"""Model runner: owns the weights and the KV cache, turns a scheduled step into tensors, runs the
model and samples.

One flat batch per step: the scheduled requests' new tokens are concatenated; positions,
slot mapping and block tables are built with numpy (no per-token Python loops) and travel to
the attention layers through the forward context.

A step is first described as plain data (`StepInput`: token ids, positions' starts, block ids,
which rows sample) and then turned into tensors, so that under tensor parallelism every rank can
build the same tensors from the same small, picklable description; only rank 0 samples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.attention.backends import get_attention_backend
from llmserve.attention.metadata import AttentionMetadata, forward_context
from llmserve.config import EngineConfig
from llmserve.distributed.communication import all_reduce_min
from llmserve.distributed.parallel_state import get_tp_world_size, rank_device
from llmserve.engine.request import Request
from llmserve.engine.sampler import Sampler, SamplerOutput
from llmserve.layers.attention import Attention
from llmserve.models.loader import load_model

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    """One step as plain Python data, identical on every rank (what workers receive)."""

    input_ids: list[int]  # the scheduled requests' new tokens, concatenated
    num_new: list[int]  # new tokens per request
    starts: list[int]  # num_computed_tokens per request (position of its first new token)
    block_ids: list[list[int]]  # KV-cache block table per request
    samples: list[int]  # indices of the requests that sample this step


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
        self.vocab_size = int(self.model.config["vocab_size"])
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._decide_num_blocks()
        self._allocate_kv_cache(get_attention_backend(config.resolved_attention_backend))
        self.sampler = Sampler()
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

            self.graphs = DecodeGraphs(self, config.scheduler.max_num_seqs)

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
    @staticmethod
    def describe(scheduled: list[tuple[Request, int]], block_ids: list[list[int]]) -> StepInput:
        """The step as plain data. A request samples when this step brings it level with its
        length (the last chunk of a prefill, or a decode); earlier prefill chunks do not."""
        input_ids: list[int] = []
        num_new: list[int] = []
        starts: list[int] = []
        samples: list[int] = []
        for i, (request, n) in enumerate(scheduled):
            start = request.num_computed_tokens
            input_ids.extend(request.all_token_ids[start : start + n])
            num_new.append(n)
            starts.append(start)
            if start + n == request.num_tokens:
                samples.append(i)
        return StepInput(input_ids, num_new, starts, block_ids, samples)

    def prepare(
        self, scheduled: list[tuple[Request, int]], block_ids: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten a step into (input_ids, positions, metadata, indices of requests that sample)."""
        step = self.describe(scheduled, block_ids)
        return (*self.prepare_step(step), step.samples)

    def prepare_step(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Tensors for a described step: (input_ids, positions, attention metadata)."""
        batch = len(step.num_new)
        num_new = np.array(step.num_new, np.int64)
        starts = np.array(step.starts, np.int64)
        cu = np.zeros(batch + 1, np.int64)
        np.cumsum(num_new, out=cu[1:])
        total = int(cu[-1])
        row = np.repeat(np.arange(batch), num_new)
        positions = np.arange(total) - cu[row] + starts[row]
        seq_lens = starts + num_new
        max_blocks = max(len(ids) for ids in step.block_ids)
        tables = np.zeros((batch, max_blocks), np.int32)
        for i, ids in enumerate(step.block_ids):
            tables[i, : len(ids)] = ids
        slots = tables[row, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size
        num_decode = int(np.argmin(num_new == 1)) if not (num_new == 1).all() else batch
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            query_start_loc=self._to_device(cu.astype(np.int32)),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            block_tables=self._to_device(tables),
            max_query_len=int(num_new.max()),
            max_seq_len=int(seq_lens.max()),
            num_decode_tokens=num_decode,
        )
        ids = torch.tensor(step.input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        return ids, self._to_device(positions), meta

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def execute(
        self, scheduled: list[tuple[Request, int]], block_ids: list[list[int]]
    ) -> tuple[list[Request], SamplerOutput | None]:
        """Run one step; return the requests that sampled (in order) and their samples."""
        return self.execute_step(self.describe(scheduled, block_ids), scheduled)

    @torch.inference_mode()
    def execute_step(
        self, step: StepInput, scheduled: list[tuple[Request, int]] | None = None
    ) -> tuple[list[Request], SamplerOutput | None]:
        """Run a described step. Tensor-parallel workers pass no `scheduled` and sample nothing:
        they run the same forward (and their share of the LM head) in lock-step with rank 0."""
        input_ids, positions, meta = self.prepare_step(step)
        if self.graphs is not None and self.graphs.can_run(meta, len(step.num_new)):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            with forward_context(meta):
                hidden = self.model(input_ids, positions)
        if not step.samples:
            return [], None
        ends = meta.query_start_loc[1:].long() - 1
        logits = self.model.compute_logits(hidden[ends[step.samples]])
        if scheduled is None or logits is None:
            return [], None
        sampling = [scheduled[i][0] for i in step.samples]
        return sampling, self.sampler(logits, sampling)

    def shutdown(self) -> None:
        """Nothing to stop in a single process (tensor-parallel executors stop their workers)."""
