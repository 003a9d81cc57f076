"""A forked child initialises the module again and works; the parent's
module is untouched. Prints one JSON line: what the child signed, and
whether the parent still finds the child's key, the child's exit status.

Usage: python3 fork.py MODULE PIN
"""

import faulthandler
import json
import os
import sys

import PyKCS11
from PyKCS11 import (
    CKA_CLASS, CKA_EC_PARAMS, CKA_KEY_TYPE, CKA_LABEL, CKF_RW_SESSION,
    CKF_SERIAL_SESSION, CKK_EC, CKM_ECDSA_SHA256, CKO_PRIVATE_KEY,
    CKO_PUBLIC_KEY,
)

faulthandler.enable()
module, pin = sys.argv[1], sys.argv[2]
flags = CKF_SERIAL_SESSION | CKF_RW_SESSION


def session(lib):
    slot = lib.getSlotList(tokenPresent=True)[0]
    s = lib.openSession(slot, flags)
    s.login(pin)
    return s


parent = PyKCS11.PyKCS11Lib()
parent.load(module)
ps = session(parent)

reader, writer = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(reader)
    result = {}
    try:
        child = PyKCS11.PyKCS11Lib()
        child.load(module)  # C_Initialize again, in the child
        cs = session(child)
        public, private = cs.generateKeyPair(
            [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_KEY_TYPE, CKK_EC),
             (CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")), (CKA_LABEL, "forked")],
            [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, "forked")],
            mecha=PyKCS11.MechanismECGENERATEKEYPAIR,
        )
        result["signature_len"] = len(cs.sign(private, b"from the child",
                                               PyKCS11.Mechanism(CKM_ECDSA_SHA256, None)))
    except Exception as e:
        result["error"] = repr(e)
    os.write(writer, json.dumps(result).encode())
    os._exit(0)
os.close(writer)
child_said = json.loads(os.read(reader, 65536).decode() or "{}")
_, status = os.waitpid(pid, 0)
found = ps.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, "forked")])
print(json.dumps({"child": child_said, "child_status": status, "parent_finds": len(found)}))
