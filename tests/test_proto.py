"""The generated protocol code is fresh, and our KServe v2 messages are wire-compatible with tritonclient's.

Our `inference.*` definitions and tritonclient's cannot share one process (protobuf's default descriptor
pool refuses a second definition of a name), so each side's descriptors are read in a subprocess.
"""

import json
import subprocess
import sys
from pathlib import Path

from atop_proto import generate

PROTO = Path(generate.__file__).parent

DUMP = """
import json, sys, importlib
modules = [importlib.import_module(name) for name in sys.argv[1:]]
def walk(d, prefix=""):
    name = prefix + d.name
    out = {name: {f.number: [f.name, f.type, f.is_repeated] for f in d.fields}}
    for nested in d.nested_types:
        if not nested.GetOptions().map_entry:
            out.update(walk(nested, name + "."))
    return out
messages = {}
for module in modules:
    for top in module.DESCRIPTOR.message_types_by_name.values():
        messages.update(walk(top))
service = modules[0].DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
           for m in service.methods}
print(json.dumps({"messages": messages, "methods": methods}))
"""


def dump(*modules: str) -> dict:
    result = subprocess.run([sys.executable, "-c", DUMP, *modules], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_generated_code_is_not_stale(tmp_path):
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = PROTO / path.name
        assert committed.exists(), f"{path.name} is not committed: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale: run `make proto`"


def test_kserve_messages_and_methods_match_the_published_protocol():
    ours, theirs = (
        dump("atop_proto.grpc_service_pb2"),
        dump("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2"),
    )
    for name, fields in ours["messages"].items():
        assert name in theirs["messages"], f"message {name} is not in the protocol"
        for number, spec in fields.items():
            assert theirs["messages"][name].get(number) == spec, f"{name} field {number} {spec} differs"
    for name, spec in ours["methods"].items():
        assert theirs["methods"][name] == spec, f"rpc {name} differs"
    assert {"ModelInfer", "ModelMetadata", "ServerLive", "ModelConfig", "RepositoryIndex"} <= set(ours["methods"])
