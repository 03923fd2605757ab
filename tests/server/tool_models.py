"""Checkpoints for the tool-calling tests: the tiny random model with other chat templates."""

from __future__ import annotations

import json
import pathlib
import shutil

# A Hermes / Qwen2.5-style template: tools in the system turn, calls in <tool_call> tags, tool
# results as user turns. Its `<tool_call>` makes the server pick the "hermes" parser.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{%- endfor %}</tools>\n"
    "Call functions inside <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{{ message.content }}{%- for tc in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{{ opening }}{% endif %}"
)
# Qwen3 with thinking switched off: the template writes the empty reasoning block itself.
THINKING_OFF = "<think>\n\n</think>\n\n"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 5},
                                  "unit": {"enum": ["c", "f"]}}}}}
COUNT = {"type": "function", "function": {
    "name": "count", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["n", "exact"],
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                       "exact": {"type": "boolean"}}}}}
TOOLS = [WEATHER, COUNT]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def with_template(checkpoint: pathlib.Path, dest: pathlib.Path, opening: str = "") -> pathlib.Path:
    """A copy of `checkpoint` whose chat template is HERMES_TEMPLATE; `opening` is written
    after the assistant header of the generation prompt."""
    if not dest.exists():
        shutil.copytree(checkpoint, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HERMES_TEMPLATE.replace("{{ opening }}", opening)
    config_path.write_text(json.dumps(config))
    return dest
