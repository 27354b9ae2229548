#!/usr/bin/env python3
"""Exit 0 iff the server's grpc.health.v1 service reports SERVING; used by the image's HEALTHCHECK, by
docker compose and by the StatefulSet's exec probes (Kubernetes' built-in `grpc:` probe does the same)."""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LONGCAT_GRPC_PORT", "50051")))
    parser.add_argument("--service", default="", help='health service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--ca-file", help="PEM CA bundle when the server uses TLS")
    parser.add_argument(
        "--leader-only",
        action="store_true",
        help="succeed at once when $NODE_RANK is set and not 0: only node 0 hosts global rank 0, the gRPC server",
    )
    args = parser.parse_args(argv)
    if args.leader_only and os.environ.get("NODE_RANK", "0") != "0":
        return 0

    target = f"{args.host}:{args.port}"
    if args.ca_file:
        with open(args.ca_file, "rb") as f:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target} reports {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
