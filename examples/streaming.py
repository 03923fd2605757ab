"""Stream a chat completion token by token (SSE), with the usage in a final chunk.

    llmserve serve --port 8000 &
    python examples/streaming.py --base-url http://127.0.0.1:8000/v1 "Tell me a story"
"""

from __future__ import annotations

import argparse
import sys
import time

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="Tell me a short story.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    start = time.perf_counter()
    first_token_at = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:  # the last chunk: no choices, only usage
            print(f"\n[{chunk.usage.completion_tokens} tokens, "
                  f"TTFT {1000 * ((first_token_at or start) - start):.0f} ms, "
                  f"total {time.perf_counter() - start:.2f} s]")
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            first_token_at = first_token_at or time.perf_counter()
            sys.stdout.write(choice.delta.content)
            sys.stdout.flush()
        if choice.finish_reason:
            print(f"\n[finish_reason: {choice.finish_reason}]", end="")


if __name__ == "__main__":
    main()
