"""Sharded layers and their weight loaders, checked rank by rank without any process group.

Each test pretends to be rank r of n (the parallel state is what layers read when they are built)
and checks that the shards recompose the full layer; collectives are done by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.distributed import parallel_state
from llmserve.distributed.parallel_state import ParallelState, check_tensor_parallel_size
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(parallel_state, "_state", ParallelState(rank=rank, world_size=world))


class RecordingSlice:
    """Stands in for a safetensors slice and records which parts were read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.reads: list = []

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tensor[index]


def test_column_parallel_rank_reads_only_its_rows(monkeypatch):
    full = torch.randn(6, 4)
    shards = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        layer = ColumnParallelLinear(4, 6)
        source = RecordingSlice(full)
        layer.weight_loader(layer.weight, source)
        assert source.reads == [slice(rank * 3, rank * 3 + 3)]
        shards.append(layer.weight.data)
    assert torch.equal(torch.cat(shards), full)


def test_row_parallel_partial_products_sum_to_full_linear(monkeypatch):
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    partial = torch.zeros(3, 5)
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        layer = RowParallelLinear(8, 5, bias=True)
        layer.weight_loader(layer.weight, weight)
        layer.weight_loader(layer.bias, bias)
        assert layer.weight.shape == (5, 4)
        partial += F.linear(x[:, rank * 4 : rank * 4 + 4], layer.weight)  # the all-reduce, by hand
    torch.testing.assert_close(partial + bias, F.linear(x, weight, bias))


def test_merged_gate_up_shards_take_each_parts_slice(monkeypatch):
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    as_rank(monkeypatch, 1, 2)
    layer = MergedColumnParallelLinear(3, {"gate": 4, "up": 4})
    layer.weight_loader(layer.weight, gate, "gate")
    layer.weight_loader(layer.weight, up, "up")
    assert layer.shard_offsets == {"gate": (0, 2), "up": (2, 2)}
    assert torch.equal(layer.weight.data, torch.cat([gate[2:], up[2:]]))


@pytest.mark.parametrize(
    "heads, kv_heads, world, expected_kv_head",
    [(4, 2, 2, [0, 1]), (4, 1, 2, [0, 0]), (4, 2, 4, [0, 0, 1, 1]), (8, 8, 2, [0, 4])],
)
def test_qkv_kv_heads_sharded_or_replicated(monkeypatch, heads, kv_heads, world, expected_kv_head):
    head_dim, hidden = 2, 4
    k = torch.arange(kv_heads * head_dim * hidden, dtype=torch.float32).reshape(-1, hidden)
    q = torch.randn(heads * head_dim, hidden)
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads)
        for name, tensor in (("q", q), ("k", k), ("v", k)):
            layer.weight_loader(layer.weight, tensor, name)
        local_q = heads // world
        assert layer.num_heads == local_q and layer.num_kv_heads == max(1, kv_heads // world)
        first = expected_kv_head[rank] * head_dim
        k_rows = layer.weight.data[local_q * head_dim : local_q * head_dim + head_dim]
        assert torch.equal(k_rows, k[first : first + head_dim])
        q_rows = layer.weight.data[: local_q * head_dim]
        assert torch.equal(q_rows, q[rank * local_q * head_dim : (rank + 1) * local_q * head_dim])


def test_vocab_parallel_embedding_and_head_with_uneven_vocab(monkeypatch):
    vocab, hidden = 5, 3
    table, ids, h = torch.randn(vocab, hidden), torch.tensor([0, 4, 2, 3]), torch.randn(2, hidden)
    embedded, logits = torch.zeros(4, hidden), []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        emb = VocabParallelEmbedding(vocab, hidden)
        emb.weight_loader(emb.weight, table)
        assert emb.weight.shape == (3, hidden)
        local = ids - emb.vocab_start
        owned = (local >= 0) & (local < emb.num_real_rows)
        embedded += F.embedding(local.clamp(0, 2), emb.weight) * owned.unsqueeze(-1)
        logits.append(F.linear(h, emb.weight))
    assert torch.equal(logits[1][:, 2], torch.zeros(2)), "the padding row must give 0 logits"
    torch.testing.assert_close(embedded, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], h @ table.T)


def test_single_rank_layers_hold_full_weights_and_match_torch():
    weight, x = torch.randn(6, 4), torch.randn(2, 4)
    col, row = ColumnParallelLinear(4, 6), RowParallelLinear(4, 6)
    for layer in (col, row):
        layer.weight_loader(layer.weight, weight)
        assert torch.equal(layer(x), F.linear(x, weight))
    head = ParallelLMHead(6, 4)
    head.weight_loader(head.weight, weight)
    assert torch.equal(head(x), F.linear(x, weight).float())


@pytest.mark.parametrize(
    "tp, heads, kv_heads, inter, message",
    [
        (3, 4, 2, 128, "must divide num_attention_heads"),
        (4, 8, 6, 128, "must divide num_key_value_heads"),
        (4, 12, 3, 128, "multiple of num_key_value_heads"),
        (2, 4, 2, 127, "must divide intermediate_size"),
        (0, 4, 2, 128, "integer >= 1"),
    ],
)
def test_tensor_parallel_size_validation(tp, heads, kv_heads, inter, message):
    cfg = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": inter}
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel_size(cfg, tp)


def test_valid_splits_pass_including_kv_replication():
    for tp, kv in ((2, 2), (2, 1), (4, 2), (8, 8)):
        check_tensor_parallel_size({"num_attention_heads": 8, "num_key_value_heads": kv,
                                    "intermediate_size": 64}, tp)
