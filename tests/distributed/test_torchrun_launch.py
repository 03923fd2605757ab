"""The documented multi-node launch, on loopback: two torchrun agents ("nodes") of one process
each join through the env:// rendezvous and run `llmserve generate --tensor-parallel-size 2`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from llmserve import LLM, SamplingParams

PROMPT = "the quick brown fox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_node_torchrun_launch_matches_single_process(checkpoint_dir):
    path = checkpoint_dir("llama-kv2")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"

    def node(rank: int) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "llmserve.cli", "generate", PROMPT, "--model", path, "--json",
            "--max-tokens", "8", "--num-kv-blocks", "64", "--tensor-parallel-size", "2",
        ]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    try:
        results = [p.communicate(timeout=200) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    for p, (_, err) in zip(nodes, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    line = [ln for ln in results[0][0].splitlines() if ln.startswith("{")][-1]
    assert not [ln for ln in results[1][0].splitlines() if ln.startswith("{")], "only rank 0 prints"
    llm = LLM(path, num_kv_blocks=64)
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert json.loads(line)["token_ids"] == expected[0].outputs[0].token_ids
