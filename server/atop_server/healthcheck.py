"""Container health check: exit 0 when the server's grpc.health.v1 says SERVING, 1 otherwise.

python -m atop_server.healthcheck [--address 127.0.0.1:8001] [--service inference.GRPCInferenceService]
The default address is the plaintext health port when one is set (ATOP_HEALTH_PORT, for servers whose main
port has TLS), else the gRPC port (ATOP_PORT).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="atop-healthcheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    health_port = os.environ.get("ATOP_HEALTH_PORT", "-1")
    port = health_port if health_port.isdigit() else os.environ.get("ATOP_PORT", "8001")
    parser.add_argument("--address", default=f"127.0.0.1:{port}")
    parser.add_argument("--service", default="", help="empty: the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
        sys.exit(1)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    sys.exit(0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1)


if __name__ == "__main__":
    main()
