"""A real OTLP/gRPC trace receiver for tests/tracing.rs: the OpenTelemetry
collector's TraceService, from the protocol's own generated code
(opentelemetry-proto), on 127.0.0.1 and a free port.

It prints `port N` once listening, then one JSON line per span received (the
protobuf's canonical JSON, ids as lowercase hex), flushed, until stdin closes.
"""

import json
import sys
from concurrent import futures

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for rs in request.resource_spans:
            resource = {
                kv.key: kv.value.string_value for kv in rs.resource.attributes
            }
            for ss in rs.scope_spans:
                for span in ss.spans:
                    d = MessageToDict(span, preserving_proto_field_name=True)
                    # JSON mapping gives bytes as base64; ids are read as hex.
                    d["trace_id"] = span.trace_id.hex()
                    d["span_id"] = span.span_id.hex()
                    d["parent_span_id"] = span.parent_span_id.hex()
                    d["resource"] = resource
                    d["scope"] = ss.scope.name
                    print(json.dumps(d), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
