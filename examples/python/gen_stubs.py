"""Generates the Python gRPC stubs of proto/ into ./generated (git-ignored).

Run it once before starting the app (the test fixtures run it too):

    python gen_stubs.py

The stubs are importable as `atoms.session.v1.session_service_pb2` and so on once ./generated
is on sys.path (app.py puts it there).
"""

import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "generated"


def generate() -> pathlib.Path:
    OUT.mkdir(exist_ok=True)
    protos = sorted(str(p) for p in (PROTO_ROOT / "atoms" / "session" / "v1").glob("*.proto"))
    # grpc_tools ships the well-known types (google/protobuf/*.proto); include them explicitly.
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))
    return OUT


if __name__ == "__main__":
    print(generate(), file=sys.stderr)
