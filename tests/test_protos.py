"""The committed generated protobuf code is exactly what the .proto files generate."""

import pytest

from rollshare.protogen import OUT, generate


def test_generated_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    written = generate(tmp_path)
    assert written, "no .proto files found"
    for f in written:
        committed = OUT / f.name
        assert committed.is_file(), f"{committed} is missing: run python node/protogen.py"
        assert committed.read_text() == f.read_text(), f"{committed.name} is stale: run python node/protogen.py"
