"""TEI's gRPC proto (``tei.proto``, package ``tei.v1``), compiled when this package is imported
(``grpc.protos_and_services``, which needs grpcio-tools: no generated code is kept).

Serve's gRPC proxy imports the servicer functions that ``SERVICER_FUNCTIONS`` names in its own
process, so this package imports grpc alone: the ingress's methods (``deployments.grpc_service``)
would bring torch into every proxy (240 MiB more of its own memory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

# grpc finds a proto (and names its modules) by its path under an entry of sys.path: the folder
# that holds the deployments package, which an editable install does not put there
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
if _PACKAGE_ROOT not in sys.path:
    sys.path.append(_PACKAGE_ROOT)

tei_pb2, tei_pb2_grpc = grpc.protos_and_services("deployments/protos/tei.proto")

#: What ``gRPCOptions.grpc_servicer_functions`` names to serve every service of the proto.
SERVICER_FUNCTIONS = [f"{tei_pb2_grpc.__name__}.add_{service}Servicer_to_server"
                      for service in ("Info", "Embed", "Rerank")]
