"""The persistent batch: one row per running request, kept across steps.

The model runner used to rebuild every request's block table from Python lists each step. Here a
request gets a row when it is first scheduled and keeps it until the scheduler releases its
blocks; the row's block table only grows by the blocks the scheduler reports as new. A step
then reads its rows with a few vectorised numpy gathers (`StepArrays`), whatever the batch size.

`StepArrays` is the step as plain arrays: what the attention metadata is made of, and what
tensor-parallel workers receive (they hold no batch state of their own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmserve.engine.kv_cache_manager import released_blocks
from llmserve.engine.scheduler import SchedulerOutput

RELEASED = -1  # block table entry of a block released behind a sliding window


@dataclass
class StepArrays:
    """One step, flattened: identical on every rank."""

    input_ids: np.ndarray  # [num_tokens] int64; 0 where the token comes from the device
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [batch + 1] int32
    seq_lens: np.ndarray  # [batch] int32
    block_tables: np.ndarray  # [batch, max_blocks] int32
    num_decode_tokens: int  # leading single-token rows
    sample_rows: np.ndarray  # [num_samples] int64: rows that sample, in order
    sample_token_index: np.ndarray  # [num_samples] int64: the flat token each samples from
    # Tokens sampled by the previous step that are this step's inputs (async scheduling):
    # input_ids[from_device_dst] = previous sampled tokens[from_device_src].
    from_device_dst: np.ndarray | None = None
    from_device_src: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def all_rows_sample_last_token(self) -> bool:
        """Every row is one decode token that samples: the hidden states need no gather."""
        return self.num_decode_tokens == self.num_tokens == len(self.sample_rows)


class InputBatch:
    """Block tables of the running requests, one persistent row each."""

    def __init__(self, max_rows: int, max_blocks_per_row: int, block_size: int,
                 release_window: int | None = None) -> None:
        self.block_size = block_size
        self.block_table = np.zeros((max_rows, max_blocks_per_row), np.int32)
        self.num_blocks = np.zeros(max_rows, np.int32)
        # Sliding window of a model whose KV manager releases blocks behind it: the same
        # entries are set to -1 here (RELEASED), so a stale id never points at a reused block.
        self.release_window = release_window
        self.num_released = np.zeros(max_rows, np.int32)
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def update(self, sched: SchedulerOutput) -> np.ndarray:
        """Apply the scheduler's deltas; return the rows of this step's requests, in order."""
        self.release(sched.freed_ids)
        rows = np.empty(len(sched.scheduled), np.int64)
        row_of = self.row_of
        for i, ((request, _), new_blocks) in enumerate(zip(sched.scheduled, sched.new_block_ids)):
            row = row_of.get(request.request_id)
            if row is None:
                if not self._free_rows:
                    self._grow()
                row = row_of[request.request_id] = self._free_rows.pop()
                self.num_blocks[row] = 0
                self.num_released[row] = 0
            if new_blocks:
                n = int(self.num_blocks[row])
                self.block_table[row, n : n + len(new_blocks)] = new_blocks
                self.num_blocks[row] = n + len(new_blocks)
            if self.release_window is not None:
                self._mark_released(row, sched.starts[i])
            rows[i] = row
        return rows

    def _mark_released(self, row: int, num_computed: int) -> None:
        """-1 for the entries the KV manager released (same rule, same `num_computed`)."""
        end = min(released_blocks(num_computed, self.release_window, self.block_size),
                  int(self.num_blocks[row]))
        start = int(self.num_released[row])
        if end > start:
            self.block_table[row, start:end] = RELEASED
            self.num_released[row] = end

    def release(self, request_ids: list[str]) -> None:
        """Give back the rows of requests whose blocks the scheduler freed."""
        for request_id in request_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self.num_blocks[row] = 0
                self._free_rows.append(row)

    def _grow(self) -> None:
        """More rows than expected (the scheduler's cap is the usual bound): double them."""
        old = len(self.num_blocks)
        self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self.num_released = np.concatenate([self.num_released, np.zeros_like(self.num_released)])
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))

    def block_ids(self, request_id: str) -> list[int]:
        """The runner's copy of a request's block table (for tests and checks)."""
        row = self.row_of.get(request_id)
        if row is None:
            return []
        return self.block_table[row, : self.num_blocks[row]].tolist()

    def build(self, sched: SchedulerOutput, rows: np.ndarray,
              pending_rows: dict[str, int] | None = None) -> StepArrays:
        """Flatten a step. `pending_rows` maps request id -> row of the previous step's sampled
        tokens, for requests whose input token is still on the device."""
        batch = len(rows)
        num_new = np.fromiter((n for _, n in sched.scheduled), np.int64, batch)
        starts = np.array(sched.starts, np.int64)
        input_ids, dst, src = _input_ids(sched, pending_rows)
        cu = np.zeros(batch + 1, np.int64)
        np.cumsum(num_new, out=cu[1:])
        total = int(cu[-1])
        if total == batch:  # every row is a single token: no repeat needed
            row_of_token, positions = np.arange(batch), starts
        else:
            row_of_token = np.repeat(np.arange(batch), num_new)
            positions = np.arange(total) - cu[row_of_token] + starts[row_of_token]
        seq_lens = starts + num_new
        bs = self.block_size
        max_blocks = int(self.num_blocks[rows].max())
        tables = self.block_table[rows, :max_blocks]
        slots = tables[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        is_one = num_new == 1
        num_decode = batch if is_one.all() else int(np.argmin(is_one))
        samples = np.array(sched.sample_indices, np.int64)
        return StepArrays(
            input_ids=input_ids, positions=positions, slot_mapping=slots,
            query_start_loc=cu.astype(np.int32), seq_lens=seq_lens.astype(np.int32),
            block_tables=tables, num_decode_tokens=num_decode,
            sample_rows=samples, sample_token_index=cu[1:][samples] - 1,
            from_device_dst=dst, from_device_src=src,
        )


def _input_ids(sched: SchedulerOutput, pending_rows: dict[str, int] | None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """This step's input tokens; those the host does not know yet are taken on the device."""
    ids: list[int] = []
    dst: list[int] = []
    src: list[int] = []
    for (request, n), start in zip(sched.scheduled, sched.starts):
        tokens = request.all_token_ids
        if n == 1:
            if start < len(tokens):
                ids.append(tokens[start])
            else:  # the token a step still in flight is sampling
                if pending_rows is None or request.request_id not in pending_rows:
                    raise RuntimeError(f"{request} has no known or in-flight input token")
                dst.append(len(ids))
                src.append(pending_rows[request.request_id])
                ids.append(0)
        else:
            ids.extend(tokens[start : start + n])
    out = np.array(ids, np.int64)
    if not dst:
        return out, None, None
    return out, np.array(dst, np.int64), np.array(src, np.int64)
