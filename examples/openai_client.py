"""Talk to `llmserve serve` with the official `openai` client, unchanged.

    llmserve serve --port 8000 &          # the embedded default model; or --model DIR
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if any")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name three colours."}],
        max_tokens=32, temperature=0.7, seed=1234, n=2,
        logprobs=True, top_logprobs=2,
        extra_body={"top_k": 50, "repetition_penalty": 1.1},  # vLLM-style extras
    )
    for choice in chat.choices:
        print(f"[{choice.index}] {choice.message.content!r} ({choice.finish_reason})")
    first = chat.choices[0].logprobs.content[0]
    print(f"first token {first.token!r}: logprob {first.logprob:.3f}, "
          f"alternatives {[t.token for t in first.top_logprobs]}")
    usage = chat.usage
    print(f"usage: {usage.prompt_tokens} prompt ({usage.prompt_tokens_details.cached_tokens} "
          f"cached) + {usage.completion_tokens} completion tokens")

    completion = client.completions.create(model=model, prompt="Once upon a time",
                                           max_tokens=16, stop=["."])
    print(f"completion: {completion.choices[0].text!r}")

    try:
        client.completions.create(model=model, prompt="x", max_tokens=10**7)
    except openai.BadRequestError as exc:
        print(f"a request over the context length is refused: {exc.body['message']}")


if __name__ == "__main__":
    main()
