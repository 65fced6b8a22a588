"""The config.pbtxt writer (checked by Triton's own parser) and the Triton release / TensorRT table."""

from __future__ import annotations

import pytest

from clipdeploy.triton import releases
from clipdeploy.triton.pbtxt import Enum, dumps


def test_writer_output_parses_with_tritons_protobuf():
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    config = {
        "name": 'odd "name" \\ with escapes',
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": "TEXT", "data_type": Enum("TYPE_STRING"), "dims": [1]}],
        "output": [{"name": "X", "data_type": Enum("TYPE_FP32"), "dims": [-1, 64]}],
        "dynamic_batching": {},
        "parameters": [{"key": "k", "value": {"string_value": "café"}}],
        "skipped": None,
    }
    parsed = pb.ModelConfig()
    text_format.Parse(dumps(config), parsed)
    assert parsed.name == 'odd "name" \\ with escapes'
    assert list(parsed.output[0].dims) == [-1, 64] and parsed.input[0].data_type == pb.TYPE_STRING
    assert parsed.HasField("dynamic_batching") and parsed.parameters["k"].string_value == "café"


def test_writer_refuses_values_it_cannot_write():
    with pytest.raises(TypeError, match="cannot write"):
        dumps({"name": object()})


def test_release_table_and_matching():
    assert releases.base("10.13.3.9") == releases.base("10.13.3") and str(releases.base("11.4")) == "11.4.0"
    assert releases.base("not a version") is None
    assert releases.loads_in("10.13.3", "10.13.3.9", version_compatible=False)
    assert not releases.loads_in("10.13.2", "10.13.3", version_compatible=False)
    assert releases.loads_in("10.13.2", "10.13.3", version_compatible=True)  # later, same major
    assert not releases.loads_in("10.13.3", "10.13.2", version_compatible=True)
    assert not releases.loads_in("10.13.3", "11.4.0", version_compatible=True)
    assert [r.name for r in releases.matching("10.13.3")] == ["25.09", "25.10"]
    assert [r.name for r in releases.matching("10.13.2", version_compatible=True)] == ["25.08", "25.09", "25.10"]
    assert releases.image("25.10") == "nvcr.io/nvidia/tritonserver:25.10-py3"
    names = [r.name for r in releases.RELEASES]
    assert names == sorted(names) and all(releases.base(r.tensorrt) for r in releases.RELEASES)
