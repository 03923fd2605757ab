"""CUDA graphs for pure-decode steps.

Decode steps launch the same small kernels every step; on a fast GPU their launch overhead, not
the math, bounds throughput. We capture the model's forward once per padded batch size and
replay it with the step's inputs copied into static buffers. Padding rows write to slot -1
(skipped by the KV store) and attend over one token of block 0, so they are harmless.
The attention backend must not read device tensors on the host in a pure-decode batch
(the Triton backend sizes its grid from `max_seq_len`, which is fixed at capture).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llmserve.attention.metadata import AttentionMetadata, forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """One captured graph per padded decode batch size, sharing one memory pool."""

    def __init__(self, model: nn.Module, device: torch.device, max_num_seqs: int,
                 max_blocks: int, max_seq_len: int) -> None:
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        self.max_blocks = max_blocks
        self.max_seq_len = max_seq_len
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            num_decode_tokens=bs,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        model = self.model
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its pool
            meta = self._meta(bs)
            with forward_context(meta):
                model(self.input_ids[:bs], self.positions[:bs])  # warm-up (autotune, allocs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = model(self.input_ids[:bs], self.positions[:bs])
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata, batch: int) -> bool:
        return (
            meta.num_decode_tokens == batch
            and batch <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= batch)
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[batch:bs].fill_(-1)
        self.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[batch:bs].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables, non_blocking=True)
        self.block_tables[batch:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:batch]
