"""A real MLLP listener for the HL7 tests: python-hl7's asyncio server
(hl7.mllp.start_hl7_server) ACKs each message, and hl7apy parses and validates it
against HL7 v2.5.1 ORU^R01 (VALIDATION_LEVEL.STRICT, then validate()). Each message
is recorded (one JSON line, flushed and synced before the ACK goes out): its text,
hl7apy's errors (none expected), and its fields as hl7apy finds them in the
message's structure, with their values unescaped by python-hl7.

A message whose patient ID (PID-3) starts with REFUSE is answered AR, MSA-3
"unknown patient <id>"; every other is answered AA.

    python listener.py PORT RECORD_FILE
"""
import asyncio
import json
import os
import sys

import hl7
from hl7.mllp import start_hl7_server
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

PORT = int(sys.argv[1])
RECORD = sys.argv[2]


def er7(element):
    return element.to_er7() if element is not None else ""


def fields(text):
    """hl7apy's strict parse (groups found) and validation; the fields read from
    the groups it found."""
    m = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    m.validate()
    unescape = hl7.parse(text).unescape
    comps = lambda raw: [unescape(c) for c in raw.split("^")]
    result = m.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    order = result.oru_r01_order_observation
    obr = order.obr
    out = {
        "structure": m.msh.msh_9.to_er7(),
        "control_id": m.msh.msh_10.to_er7(),
        "version": m.msh.msh_12.to_er7(),
        "charset": m.msh.msh_18.to_er7(),
        "pid_3": comps(pid.pid_3.to_er7()),
        "pid_5": comps(pid.pid_5.to_er7()) if pid.pid_5.to_er7() else [],
        "pid_7": pid.pid_7.to_er7(),
        "pid_8": pid.pid_8.to_er7(),
        "orc_1": order.orc.orc_1.to_er7(),
        "obr_2": unescape(obr.obr_2.to_er7()),
        "obr_3": unescape(obr.obr_3.to_er7()),
        "obr_5": obr.obr_5.to_er7(),
        "obr_18": unescape(obr.obr_18.to_er7()),
        "obr_25": obr.obr_25.to_er7(),
        "nte": [unescape(n.nte_3.to_er7()) for n in order.children if n.name == "NTE"],
        "obx": [],
    }
    for obs in order.children:
        if obs.name != "ORU_R01_OBSERVATION":
            continue
        x = obs.obx
        out["obx"].append(
            {
                "type": x.obx_2.to_er7(),
                "code": comps(x.obx_3.to_er7()),
                "value": comps(x.obx_5.to_er7()) if x.obx_2.to_er7() == "CWE" else unescape(x.obx_5.to_er7()),
                "flag": x.obx_8.to_er7(),
                "status": x.obx_11.to_er7(),
            }
        )
    return out


def record(entry):
    with open(RECORD, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def serve(reader, writer):
    try:
        while not writer.is_closing():
            msg = await reader.readmessage()
            text = str(msg)
            entry = {"raw": text, "errors": []}
            try:
                entry["fields"] = fields(text)
            except Exception as e:  # recorded: the test fails on any
                entry["errors"].append(f"{type(e).__name__}: {e}")
            patient = str(msg.segment("PID")[3]).split("^")[0]
            refuse = patient.startswith("REFUSE")
            ack = msg.create_ack("AR" if refuse else "AA")
            if refuse:
                msa = str(ack.segment("MSA"))
                ack = hl7.parse(str(ack).replace(msa, f"{msa}|unknown patient {patient}"))
            entry["ack"] = str(ack)
            record(entry)
            writer.writemessage(ack)
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def main():
    async with await start_hl7_server(serve, "127.0.0.1", PORT, encoding="utf-8") as server:
        print("listening", flush=True)
        await server.serve_forever()


asyncio.run(main())
