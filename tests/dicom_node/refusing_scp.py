"""A C-STORE SCP (pynetdicom) that takes SR and Secondary Capture presentation
contexts but answers the C-STORE of one SOP class with a failure status: a
destination that refuses an object after negotiating it.

    refusing_scp.py PORT LOG REFUSED_SOP_CLASS STATUS_HEX

Each C-STORE is a JSON line in LOG: its association, SOP class, SOP Instance UID
and the status answered.
"""
import json
import sys

from pynetdicom import AE, evt

port, log_path, refused, status = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4], 16)
log = open(log_path, "a", buffering=1)


def on_store(event):
    cls = str(event.request.AffectedSOPClassUID)
    uid = str(event.request.AffectedSOPInstanceUID)
    answered = status if cls == refused else 0x0000
    log.write(json.dumps({"association": id(event.assoc), "class": cls, "uid": uid,
                          "status": answered}) + "\n")
    return answered


ae = AE(ae_title="REFUSER")
for sop_class in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"):
    ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
ae.start_server(("127.0.0.1", int(port)), block=True,
                evt_handlers=[(evt.EVT_C_STORE, on_store)])
