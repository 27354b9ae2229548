"""The committed generated code matches proto/longcat/v1/longcat.proto, and the shipped copy is current."""

from __future__ import annotations

import pytest

from longcat_service.server import codegen
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc


def test_generated_code_is_current():
    pytest.importorskip("grpc_tools")
    assert codegen.stale_files() == [], "run: python -m longcat_service.server.codegen (with grpcio-tools 1.84.0)"


def test_generated_code_has_the_contract():
    service = pb.DESCRIPTOR.services_by_name["LongCat"]
    assert service.full_name == "longcat.v1.LongCat"
    assert {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods} == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Abort": ("AbortRequest", "AbortResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
    }
    assert hasattr(pb_grpc, "LongCatStub") and hasattr(pb_grpc, "add_LongCatServicer_to_server")
    # proto3 `optional`: unset sampling fields are distinguishable from 0
    params = pb.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")


def test_normalise_masks_only_version_lines():
    a = "# Protobuf Python Version: 7.35.1\nGRPC_GENERATED_VERSION = '1.84.0'\nx = 1\n"
    b = "# Protobuf Python Version: 7.36.0\nGRPC_GENERATED_VERSION = '1.85.1'\nx = 1\n"
    assert codegen.normalise(a) == codegen.normalise(b)
    assert codegen.normalise(a) != codegen.normalise(b.replace("x = 1", "x = 2"))
