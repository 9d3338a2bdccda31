"""Drives a running cxr-serve's gRPC listener with NVIDIA's own Open Inference
Protocol client (tritonclient[grpc] from PyPI) and discovers its services by server
reflection (grpcio-reflection), as grpcurl does. Probabilities must equal /predict's
for the same image. Called by tests/v2_grpc.rs with:
HTTP_ADDR GRPC_ADDR KEY MODEL PNG TENSOR_F32 SIZE
"""
import json
import sys
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

http_addr, grpc_addr, key, model, png_path, tensor_path, size = sys.argv[1:8]
size = int(size)
png = open(png_path, "rb").read()
tensor = np.fromfile(tensor_path, dtype="<f4").reshape(1, 3, size, size)
auth = {"authorization": f"Bearer {key}"}

req = urllib.request.Request(
    f"http://{http_addr}/predict?model={model}",
    data=png,
    headers={"Content-Type": "image/png", "Authorization": f"Bearer {key}"},
)
want = json.load(urllib.request.urlopen(req))
want_p = np.array([want["probabilities"]["NORMAL"], want["probabilities"]["PNEUMONIA"]], dtype=np.float32)

c = grpcclient.InferenceServerClient(url=grpc_addr)
assert c.is_server_live()
assert c.is_server_ready()
assert c.is_model_ready(model)
meta = c.get_server_metadata(as_json=True)
assert meta["name"] == "cxr", meta
mm = c.get_model_metadata(model, headers=auth, as_json=True)
assert mm["platform"] == "onnxruntime_onnx", mm
assert {i["name"]: i["datatype"] for i in mm["inputs"]} == {"image": "BYTES", "input": "FP32"}, mm
version = mm["versions"][0]

checked = 0
img = grpcclient.InferInput("image", [1], "BYTES")
img.set_data_from_numpy(np.array([png], dtype=np.object_))
ten = grpcclient.InferInput("input", [1, 3, size, size], "FP32")
ten.set_data_from_numpy(tensor)
for inp in (img, ten):
    outs = [grpcclient.InferRequestedOutput("probabilities"), grpcclient.InferRequestedOutput("label")]
    r = c.infer(model, [inp], outputs=outs, request_id="grpc-1", model_version=version, headers=auth)
    p = r.as_numpy("probabilities")
    assert p.shape == (1, 2) and p.dtype == np.float32, (p.shape, p.dtype)
    assert np.allclose(p[0], want_p, atol=1e-6), (p, want_p, inp.name())
    label = r.as_numpy("label")[0]
    label = label.decode() if isinstance(label, bytes) else label
    assert label == want["label"], (label, want["label"])
    assert r.get_response().id == "grpc-1"
    checked += 1

# Two images in one request: two answers, in order.
img2 = grpcclient.InferInput("image", [2], "BYTES")
img2.set_data_from_numpy(np.array([png, png], dtype=np.object_))
r = c.infer(model, [img2], headers=auth)
assert r.as_numpy("probabilities").shape == (2, 2)
checked += 1


def code_of(call):
    try:
        call()
    except InferenceServerException as e:
        return e.status(), str(e)
    raise AssertionError("accepted")


status, msg = code_of(lambda: c.infer("no-such-model", [img], headers=auth))
assert status == "StatusCode.NOT_FOUND", (status, msg)
bad = grpcclient.InferInput("input", [1, 3, size + 1, size], "FP32")
bad.set_data_from_numpy(np.zeros([1, 3, size + 1, size], dtype=np.float32))
status, msg = code_of(lambda: c.infer(model, [bad], headers=auth))
assert status == "StatusCode.INVALID_ARGUMENT" and "shape" in msg, (status, msg)
status, msg = code_of(lambda: c.infer(model, [img]))
assert status == "StatusCode.UNAUTHENTICATED", (status, msg)
status, msg = code_of(lambda: c.infer(model, [img], headers={"authorization": "Bearer wrong"}))
assert status == "StatusCode.UNAUTHENTICATED", (status, msg)

# Discovery by reflection, as grpcurl does it: the services, a method's messages, and
# a call of the health service built from the reflected descriptors alone.
from google.protobuf import message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

channel = grpc.insecure_channel(grpc_addr)
db = ProtoReflectionDescriptorDatabase(channel)
services = set(db.get_services())
assert "inference.GRPCInferenceService" in services, services
assert "grpc.health.v1.Health" in services, services
pool = DescriptorPool(db)
svc = pool.FindServiceByName("inference.GRPCInferenceService")
infer = svc.methods_by_name["ModelInfer"]
assert infer.input_type.full_name == "inference.ModelInferRequest"
health = pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
Req = message_factory.GetMessageClass(health.input_type)
Resp = message_factory.GetMessageClass(health.output_type)
call = channel.unary_unary(
    "/grpc.health.v1.Health/Check",
    request_serializer=Req.SerializeToString,
    response_deserializer=Resp.FromString,
)
resp = call(Req(service="inference.GRPCInferenceService"))
assert resp.status == 1, resp  # SERVING

print(f"{checked} gRPC inferences agree with /predict; errors and reflection as expected")
