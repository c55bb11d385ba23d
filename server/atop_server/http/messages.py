"""Protobuf messages of the KServe gRPC API as the JSON of its REST API: field names as in the .proto, every
field present, and 64-bit integers as JSON numbers (protobuf's own JSON writes them as strings, which REST
clients such as tritonclient.http do not expect of shapes and counts)."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def to_json(message: Message) -> dict[str, Any]:
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _numbers(message.DESCRIPTOR, data)
    return data


def _numbers(descriptor: Descriptor, data: dict[str, Any]) -> None:
    """Turn the 64-bit integers of `data` (a message of type `descriptor`, as MessageToDict wrote it) into ints."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                for item in value.values():
                    _numbers(entry.message_type, item)
            elif entry.type in _INT64:
                data[field.name] = {key: int(item) for key, item in value.items()}
        elif field.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _numbers(field.message_type, item)
        elif field.type in _INT64:
            data[field.name] = [int(item) for item in value] if isinstance(value, list) else int(value)
