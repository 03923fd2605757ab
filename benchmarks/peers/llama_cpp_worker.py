"""llama.cpp (through llama-cpp-python's C API) as a long-lived greedy-decode worker.

Runs with the llama.cpp peer's virtualenv (`make peer-llama-cpp`); benchmarks/cpu_decode_latency.py
starts it once and sends it the same token ids its own rounds use. All sequences of a request
decode together in one llama.cpp context (one `llama_decode` per step, one sequence id per
prompt), the way llama.cpp's own batched example and server run them. One JSON object per line:

    stdin:  {"prompts": [[ids...], ...], "new_tokens": N}
    stdout: {"ready": true, "startup_s": ..., "versions": {...}}         once, after loading
            {"elapsed_s": ..., "first_token_s": ..., "decode_s": ..., "cpu_s": ...,
             "decode_cpu_s": ..., "token_ids": [[...], ...]}

`first_token_s` is when every prompt's first token is sampled (all prompts prefill in one
batch); `decode_s` is the time from there to the last token, so decode_s / (N - 1) is the
per-token latency that llmserve's benchmark reports for one stream.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.perf_counter()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=8192, help="KV cells shared by all sequences")
    p.add_argument("--n-seq-max", type=int, default=16)
    p.add_argument("--n-batch", type=int, default=2048)
    p.add_argument("--kv-type", choices=("f32", "f16"), default="f32",
                   help="KV cache element type (f32 matches llmserve's fp32 cache and tokens)")
    p.add_argument("--flash-attn", choices=("off", "on", "auto"), default="off",
                   help="llama.cpp's flash attention; its CPU kernel rounds through f16 (with it "
                        "on, greedy tokens left transformers' within a few tokens), so off keeps "
                        "the comparison fp32 like for like")
    return p.parse_args(argv)


class Worker:
    """One model, one context sized for the largest request, one greedy sampler."""

    def __init__(self, args: argparse.Namespace) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(args.gguf.encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {args.gguf}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = args.n_ctx
        cparams.n_batch = args.n_batch
        cparams.n_ubatch = min(512, args.n_batch)
        cparams.n_seq_max = args.n_seq_max
        cparams.n_threads = args.threads
        cparams.n_threads_batch = args.threads
        kv = L.GGML_TYPE_F32 if args.kv_type == "f32" else L.GGML_TYPE_F16
        cparams.type_k = kv
        cparams.type_v = kv
        cparams.flash_attn_type = {"off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                                   "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO}[args.flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create its context")
        self.n_batch = args.n_batch
        self.batch = L.llama_batch_init(args.n_batch, 0, args.n_seq_max)
        self.sampler = L.llama_sampler_init_greedy()
        self.memory = L.llama_get_memory(self.ctx)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence id, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(entries)

    def _decode(self) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _sample(self, index: int) -> int:
        return int(self.L.llama_sampler_sample(self.sampler, self.ctx, index))

    def run(self, request: dict) -> dict:
        prompts, new_tokens = request["prompts"], int(request["new_tokens"])
        self.L.llama_memory_clear(self.memory, True)
        out: list[list[int]] = [[] for _ in prompts]
        start, cpu_start = time.perf_counter(), time.process_time()
        # Prefill: every prompt, in batches of at most n_batch tokens, logits at each last token.
        entries = [(tok, pos, seq, pos == len(p) - 1)
                   for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        for lo in range(0, len(entries), self.n_batch):
            chunk = entries[lo:lo + self.n_batch]
            self._fill(chunk)
            self._decode()
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    out[seq].append(self._sample(i))
        first, first_cpu = time.perf_counter(), time.process_time()
        lengths = [len(p) for p in prompts]
        for step in range(new_tokens - 1):
            self._fill([(out[s][-1], lengths[s] + step, s, True) for s in range(len(prompts))])
            self._decode()
            for s in range(len(prompts)):
                out[s].append(self._sample(s))
        end = time.perf_counter()
        return {"elapsed_s": end - start, "first_token_s": first - start, "decode_s": end - first,
                "cpu_s": time.process_time() - cpu_start,
                "decode_cpu_s": time.process_time() - first_cpu, "token_ids": out}

    def versions(self) -> dict:
        from importlib.metadata import version

        return {"llama_cpp_python": version("llama-cpp-python"),
                "system_info": self.L.llama_print_system_info().decode(errors="replace").strip()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The protocol has stdout to itself: llama.cpp's own logs go to stderr.
    worker = Worker(args)
    worker.run({"prompts": [list(range(10, 18))], "new_tokens": 4})  # warm-up, as llmserve gets
    print(json.dumps({"ready": True, "startup_s": time.perf_counter() - T0,
                      "versions": worker.versions()}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(worker.run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
