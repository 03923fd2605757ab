"""Convert a Hugging Face checkpoint to an f32 GGUF with llama.cpp's own converter.

The converter is the `convert_hf_to_gguf.py` of the llama.cpp sources that `make peer-llama-cpp`
keeps under `.venv-llama/src`; it runs in llmserve's virtualenv (it needs torch and
transformers, which that one has). Two of its checks are bypassed, because the benchmark
checkpoints are random-weight models with a small stand-in tokenizer that llama.cpp never uses
(the benchmark sends token ids):

- its pre-tokenizer lookup (a hash of the tokenizer's output on a test string) does not know the
  stand-in, so the Qwen2 pre-tokenizer name is written;
- Qwen2/Qwen3 vocabularies are read as GPT-2-style BPE directly, without trying SentencePiece.

    python benchmarks/peers/gguf_convert.py CHECKPOINT_DIR OUT.gguf
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def llama_cpp_sources() -> Path:
    """The llama.cpp tree inside the llama-cpp-python sources kept by `make peer-llama-cpp`."""
    found = sorted((ROOT / ".venv-llama" / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        raise SystemExit("llama.cpp's sources are missing under .venv-llama/src; run `make peer-llama-cpp`")
    return found[-1]


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    checkpoint, out = argv
    src = llama_cpp_sources()
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    import conversion.base as base
    import conversion.qwen as qwen

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    qwen.Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()
    sys.argv = [str(src / "convert_hf_to_gguf.py"), checkpoint, "--outtype", "f32", "--outfile", out]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
