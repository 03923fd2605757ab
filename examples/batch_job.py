"""Run a batch job through the OpenAI Batch API of `llmserve serve`, with the openai client.

    llmserve serve --port 8000 --batch-dir ./batches &
    python examples/batch_job.py examples/batch_input.jsonl --base-url http://127.0.0.1:8000/v1

The same file runs offline, with no server, resumable after a crash:

    llmserve batch examples/batch_input.jsonl -o results.jsonl --errors errors.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import openai

DONE = ("completed", "failed", "expired", "cancelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="batch input file (JSONL)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--endpoint", default="/v1/chat/completions",
                        help="lines with another url make the batch fail validation")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    lines = [json.loads(s) for s in args.input.read_text().splitlines() if s.strip()]
    chosen = [line for line in lines if line["url"] == args.endpoint]
    upload = client.files.create(
        file=(args.input.name, "".join(json.dumps(line) + "\n" for line in chosen).encode()),
        purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=args.endpoint,
                                  completion_window="24h", metadata={"example": "batch_job"})
    print(f"batch {batch.id}: {len(chosen)} requests")
    while batch.status not in DONE:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
        c = batch.request_counts
        print(f"  {batch.status}: {c.completed} completed, {c.failed} failed of {c.total}")
    if batch.errors:
        for e in batch.errors.data:
            print(f"  line {e.line}: {e.message}")
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            for text in client.files.content(file_id).text.splitlines():
                result = json.loads(text)
                body = result["response"]["body"]
                if result["response"]["status_code"] == 200:
                    texts = [c["message"]["content"] if "message" in c else c["text"]
                             for c in body["choices"]]
                    print(f"{result['custom_id']}: {texts}")
                else:
                    print(f"{result['custom_id']}: error: {body['error']['message']}")
    print(f"usage: {batch.usage.total_tokens} tokens" if batch.usage else "")


if __name__ == "__main__":
    main()
