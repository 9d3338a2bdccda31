"""Drives a running cxr-serve with NVIDIA's own Open Inference Protocol client
(tritonclient[http] from PyPI): health, metadata, readiness, and inference with each
input kind, with and without binary data. Probabilities must equal /predict's for the
same image. Called by tests/v2_tritonclient.rs with: ADDR MODEL PNG TENSOR_F32 SIZE
"""
import base64
import json
import sys
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

addr, model, png_path, tensor_path, size = sys.argv[1:6]
size = int(size)
png = open(png_path, "rb").read()
tensor = np.fromfile(tensor_path, dtype="<f4").reshape(1, 3, size, size)

req = urllib.request.Request(
    f"http://{addr}/predict?model={model}", data=png, headers={"Content-Type": "image/png"}
)
want = json.load(urllib.request.urlopen(req))
want_p = np.array([want["probabilities"]["NORMAL"], want["probabilities"]["PNEUMONIA"]], dtype=np.float32)

c = httpclient.InferenceServerClient(url=addr)
assert c.is_server_live()
assert c.is_server_ready()
assert c.is_model_ready(model)
assert not c.is_model_ready("no-such-model")
meta = c.get_server_metadata()
assert meta["name"] == "cxr" and "binary_tensor_data" in meta["extensions"], meta
mm = c.get_model_metadata(model)
assert mm["platform"] == "onnxruntime_onnx", mm
assert {i["name"]: i["datatype"] for i in mm["inputs"]} == {"image": "BYTES", "input": "FP32"}, mm
version = mm["versions"][0]
assert c.get_model_metadata(model, model_version=version)["name"] == model

checked = 0
for binary_in in (True, False):
    for binary_out in (True, False):
        # (a) the encoded file. In JSON, BYTES must be UTF-8 text: send base64.
        img = httpclient.InferInput("image", [1], "BYTES")
        payload = png if binary_in else base64.b64encode(png)
        img.set_data_from_numpy(np.array([payload], dtype=np.object_), binary_data=binary_in)
        # (b) the preprocessed tensor.
        ten = httpclient.InferInput("input", [1, 3, size, size], "FP32")
        ten.set_data_from_numpy(tensor, binary_data=binary_in)
        for inp in (img, ten):
            outs = [
                httpclient.InferRequestedOutput("probabilities", binary_data=binary_out),
                httpclient.InferRequestedOutput("label", binary_data=binary_out),
            ]
            r = c.infer(model, [inp], outputs=outs, request_id="interop-1", model_version=version)
            p = r.as_numpy("probabilities")
            assert p.shape == (1, 2) and p.dtype == np.float32, (p.shape, p.dtype)
            assert np.allclose(p[0], want_p, atol=1e-6), (p, want_p, inp.name(), binary_in, binary_out)
            label = r.as_numpy("label")[0]
            label = label.decode() if isinstance(label, bytes) else label
            assert label == want["label"], (label, want["label"])
            assert r.get_response()["id"] == "interop-1"
            checked += 1

# No outputs named: the client asks for all of them in binary.
r = c.infer(model, [img])
assert np.allclose(r.as_numpy("probabilities")[0], want_p, atol=1e-6)

# Errors reach the client as its exception, with the server's message.
bad = httpclient.InferInput("image", [1], "FP32")
bad.set_data_from_numpy(np.zeros([1], dtype=np.float32))
try:
    c.infer(model, [bad])
    raise AssertionError("a wrong datatype was accepted")
except InferenceServerException as e:
    assert "BYTES" in str(e), e
try:
    c.infer("no-such-model", [img])
    raise AssertionError("an unknown model was accepted")
except InferenceServerException as e:
    assert "no-such-model" in str(e), e

print(f"tritonclient interop: {checked} inferences agree with /predict")
