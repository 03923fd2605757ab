"""Token embedding and the LM head, split over the tensor-parallel ranks along the vocabulary.

Rank r holds rows [r*n, (r+1)*n) of the (vocab, hidden) table, n = ceil(vocab / tp); the last
rank's rows past the vocabulary are zero padding. The embedding looks up the ids it owns, zeroes
the others and sums over the ranks; the LM head computes its slice of the logits and rank 0, the
only rank that samples, gathers the full row. At tensor_parallel_size=1 both hold the whole table
and do exactly one `F.embedding` / `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.distributed.communication import all_reduce, gather_to_first_rank
from llmserve.distributed.parallel_state import get_tp_rank, get_tp_world_size
from llmserve.kernels import cpu_packed_gemm
from llmserve.layers.linear import Loaded, loaded_shape, read_part


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        # Rows of this rank's slice that are real tokens (the rest is padding on the last rank).
        self.num_real_rows = max(0, min(self.rows_per_rank, vocab_size - self.vocab_start))
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, hidden_size), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.num_real_rows)
        out = F.embedding(torch.where(owned, local, 0), self.weight)
        out.masked_fill_(~owned.unsqueeze(-1), 0)
        return all_reduce(out)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard: str | None = None) -> None:
        expected = (self.vocab_size, param.shape[1])
        if loaded_shape(loaded) != expected:
            raise ValueError(f"checkpoint shape {loaded_shape(loaded)} != expected {expected}")
        rows = self.num_real_rows
        if rows:
            param.data[:rows].copy_(read_part(loaded, 0, self.vocab_start, rows))
        param.data[rows:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits (float32), only for the rows that sample.

    With tensor parallelism, ranks other than 0 return None: they only contribute their slice.
    """

    # An MKL-packed copy of the weight for decode-sized calls on CPU, set by
    # `llmserve.models.cpu_fast_path.pack_weights` (not a parameter: never saved or moved).
    packed = None
    # Exact greedy tokens without the float32 logits (`llmserve.kernels.cpu_greedy.GreedyHead`),
    # set by `llmserve.models.cpu_fast_path.optimize_for_cpu` where it applies.
    greedy = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.tp_size == 1:
            return cpu_packed_gemm.linear(hidden, self.weight, None, self.packed).float()
        logits = gather_to_first_rank(F.linear(hidden, self.weight))
        if logits is None:
            return None
        if logits.shape[-1] != self.vocab_size:  # drop the last rank's padding rows
            logits = logits[..., : self.vocab_size].contiguous()
        return logits.float()


# The names the single-device code has always used.
VocabEmbedding = VocabParallelEmbedding
LMHead = ParallelLMHead
