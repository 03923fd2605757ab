"""Regenerate the checked-in Python stubs of `llmserve.proto` (needs grpcio-tools).

    python -m llmserve.server.grpc.generate_stubs           # rewrite the stubs
    python -m llmserve.server.grpc.generate_stubs --check   # exit 1 if they are stale

The proto is compiled with the package root as include path, so the generated modules import
each other as `llmserve.server.grpc.llmserve_pb2` with no hand edits. Two version guards that
grpcio-tools writes are relaxed, so the stubs load on every runtime the project supports:
protobuf's gencode check (it would demand a runtime at least as new as the compiler) and
grpcio's (it would demand the compiler's grpcio, and needs a helper grpcio < 1.63 lacks). The
`_registered_method` flag, a sync-stack optimisation older grpcio refuses, is dropped. The stubs
then only use features of protobuf >= 4.25 and grpcio >= 1.62 (the floors in pyproject.toml).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parents[2]  # the directory that holds the `llmserve` package
PROTO = HERE / "llmserve.proto"
GRPC_FLOOR = "1.62.0"
OUTPUTS = ("llmserve_pb2.py", "llmserve_pb2.pyi", "llmserve_pb2_grpc.py")

_RUNTIME_IMPORT = re.compile(r"^from google\.protobuf import runtime_version as _runtime_version\n",
                             re.M)
_RUNTIME_CHECK = re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n",
                            re.M)
_GRPC_VERSION = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M)
# grpcio < 1.63 has no grpc._utilities.first_version_is_lower, so the generated check would
# refuse it whatever the floor; compare the numbers directly instead.
_GRPC_CHECK = re.compile(r"^try:\n    from grpc\._utilities import first_version_is_lower\n"
                         r"(?:.*\n)*?    _version_not_supported = True\n", re.M)
_GRPC_CHECK_NEW = """def _version(text):
    return tuple(int(part) for part in re.findall(r"\\d+", text)[:3])


_version_not_supported = _version(GRPC_VERSION) < _version(GRPC_GENERATED_VERSION)
"""


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"  # well-known types
    rel = PROTO.relative_to(PACKAGE_ROOT)
    code = protoc.main(["grpc_tools.protoc", f"-I{PACKAGE_ROOT}", f"-I{include}", *args,
                        str(rel)])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def _relax(name: str, text: str) -> str:
    if name.endswith("_pb2.py"):
        text = _RUNTIME_IMPORT.sub("", text)
        text = _RUNTIME_CHECK.sub(
            "# (protobuf's gencode version check removed by generate_stubs: loads on >= 4.25)\n",
            text)
    if name.endswith("_pb2_grpc.py"):
        text = _GRPC_VERSION.sub(f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text)
        text, found = _GRPC_CHECK.subn(lambda _: _GRPC_CHECK_NEW, text)
        if not found:
            raise RuntimeError("unexpected grpcio version check in the generated stub; "
                               "update generate_stubs._GRPC_CHECK")
        text = text.replace("import grpc\n", "import re\n\nimport grpc\n", 1)
        # `_registered_method` (a sync-stack optimisation) is refused by grpcio < 1.63.
        text = re.sub(r",\n\s*_registered_method=True\)", ")", text)
        text = re.sub(r"^(\s*)(server\.add_registered_method_handlers\(.*\))$",
                      r"\1if hasattr(server, 'add_registered_method_handlers'):\n\1    \2",
                      text, flags=re.M)
    return text


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto into `out_dir` (mirroring the package layout); return the stubs."""
    _protoc([f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"])
    stub_dir = out_dir / PROTO.parent.relative_to(PACKAGE_ROOT)
    paths = []
    for name in OUTPUTS:
        path = stub_dir / name
        path.write_text(_relax(name, path.read_text(encoding="utf-8")), encoding="utf-8")
        paths.append(path)
    return paths


def compiled_descriptor() -> bytes:
    """The FileDescriptorProto of the proto as it is now (for staleness checks)."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        _protoc([f"--descriptor_set_out={out}"])
        file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    proto = file_set.file[0]
    _drop_json_names(proto.message_type)  # generated modules do not embed them
    return proto.SerializeToString(deterministic=True)


def _drop_json_names(messages) -> None:
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _drop_json_names(message.nested_type)


def checked_in_descriptor() -> bytes:
    from google.protobuf import descriptor_pb2

    from llmserve.server.grpc import llmserve_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    llmserve_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto.SerializeToString(deterministic=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the checked-in stubs match the proto")
    args = parser.parse_args(argv)
    if args.check:
        if compiled_descriptor() != checked_in_descriptor():
            print("llmserve_pb2.py is stale: run python -m llmserve.server.grpc.generate_stubs",
                  file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (HERE / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
            print(f"wrote {HERE / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
