"""A hostile stream client, run as its own process: `python abuse_stream.py ADDRESS PATTERN`.

It abuses ModelStreamInfer in one of several ways, prints "ready" once it has, then holds its connection
open until it is killed (so that the server must stop with these streams still open).
  garbage  raw bytes that are no protobuf message ([urandom(300), b"\\xff" * 50]), reading until the error
  idle     a stream that never sends anything
  unread   valid requests sent continuously, responses never read (flow control pushes back)
  halfway  a valid request, then garbage, without reading
"""

import os
import sys
import threading

import grpc

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def valid_request() -> bytes:
    from atop_proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="IMAGE", datatype="FP32", shape=[16, 3, 32, 32])
    request.raw_input_contents.append(bytes(16 * 3 * 32 * 32 * 4))
    return request.SerializeToString()


def main() -> None:
    address, pattern = sys.argv[1], sys.argv[2]
    forever = threading.Event()
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=60)
    stream = channel.stream_stream(METHOD)  # no serializers: the messages go out as the bytes given

    def messages():
        if pattern == "garbage":
            yield from (os.urandom(300), b"\xff" * 50)
        elif pattern == "unread":
            while True:
                yield valid_request()
        elif pattern == "halfway":
            yield valid_request()
            yield b"\xff" * 50
        forever.wait()

    call = stream(messages())
    if pattern == "garbage":
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            print(f"error {error.code().name}", file=sys.stderr)
    print("ready", flush=True)
    forever.wait()


if __name__ == "__main__":
    main()
