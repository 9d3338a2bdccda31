"""The same Open Inference Protocol request over REST and over gRPC, each sent by
NVIDIA's own client (tritonclient[http] and tritonclient[grpc]), must get the same
answer: the same outputs and the same response parameters (threshold as a number,
its source, the caller's x-request-id, the execution provider), and the same
refusal for a parameter of the wrong type. Called by tests/v2_grpc.rs with:
HTTP_ADDR GRPC_ADDR MODEL PNG
"""
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

http_addr, grpc_addr, model, png_path = sys.argv[1:5]
png = open(png_path, "rb").read()
h = httpclient.InferenceServerClient(url=http_addr)
g = grpcclient.InferenceServerClient(url=grpc_addr)


def grpc_params(resp):
    # {"threshold": {"double_param": 0.3}, ...} -> {"threshold": 0.3, ...}
    return {k: next(iter(v.values())) for k, v in resp.get("parameters", {}).items()}


def both(parameters, outputs=("probabilities", "label"), rid="parity-1"):
    hi = httpclient.InferInput("image", [1], "BYTES")
    hi.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    gi = grpcclient.InferInput("image", [1], "BYTES")
    gi.set_data_from_numpy(np.array([png], dtype=np.object_))
    hr = h.infer(model, [hi], outputs=[httpclient.InferRequestedOutput(o) for o in outputs],
                 parameters=parameters, headers={"x-request-id": rid})
    gr = g.infer(model, [gi], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                 parameters=parameters, headers={"x-request-id": rid})
    return hr, gr


checked = 0
for parameters in ({}, {"threshold": 0.3}, {"threshold": 0.7}, {"threshold": 0.5}):
    hr, gr = both(parameters)
    for o in ("probabilities", "label"):
        a, b = hr.as_numpy(o), gr.as_numpy(o)
        assert a.shape == b.shape and a.dtype == b.dtype, (o, a, b)
        assert (a == b).all(), (parameters, o, a, b)
    hp = dict(hr.get_response()["parameters"])
    gp = grpc_params(gr.get_response(as_json=True))
    # The server's own request ids differ; everything else is the same.
    assert hp.pop("request_id") != gp.pop("request_id")
    assert hp == gp, (parameters, hp, gp)
    assert hp["client_request_id"] == "parity-1", hp
    assert isinstance(gp["threshold"], float), gp
    if "threshold" in parameters:
        assert hp["threshold"] == parameters["threshold"] and hp["threshold_source"] == "query", hp
    else:
        assert hp["threshold_source"] == "card", hp
    checked += 1

# A threshold of the wrong type is refused alike.
errors = []
for client, mk in ((h, httpclient), (g, grpcclient)):
    i = mk.InferInput("image", [1], "BYTES")
    i.set_data_from_numpy(np.array([png], dtype=np.object_))
    try:
        client.infer(model, [i], parameters={"threshold": True})
        raise SystemExit("a boolean threshold was accepted")
    except InferenceServerException as e:
        errors.append(e.message())
assert all("parameter `threshold` must be a number" in m for m in errors), errors
print(f"{checked} requests answered alike over REST and gRPC")
