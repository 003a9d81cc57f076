"""PyKCS11 (unmodified) against libkeysync_pkcs11.so: THREADS threads, a
session each, CYCLES times: generate a P-256 pair, sign at once with
CKM_ECDSA_SHA256, verify. Prints one JSON line: cycles, failures, the key
ids (CKA_ID, hex) made, and what reading a private key's CKA_VALUE gave.

With PROGRESS=1 in the environment it also prints "cycle" on stderr
after each cycle, so a test can act midway through the run.

Usage: python3 threads.py MODULE PIN THREADS CYCLES
"""

import json
import os
import sys
import threading

import PyKCS11
from PyKCS11 import (
    CKA_CLASS, CKA_EC_PARAMS, CKA_ID, CKA_KEY_TYPE, CKA_LABEL, CKA_PRIVATE,
    CKA_SENSITIVE, CKA_SIGN, CKA_TOKEN, CKA_VALUE, CKA_VERIFY, CKF_RW_SESSION,
    CKF_SERIAL_SESSION, CKK_EC, CKM_ECDSA_SHA256, CKO_PRIVATE_KEY,
    CKO_PUBLIC_KEY,
)

module, pin, threads, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
P256 = bytes.fromhex("06082a8648ce3d030107")
DATA = b"signed from a Python thread"

lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = lib.getSlotList(tokenPresent=True)[0]
flags = CKF_SERIAL_SESSION | CKF_RW_SESSION
first = lib.openSession(slot, flags)
first.login(pin)

progress = os.environ.get("PROGRESS") == "1"
lock = threading.Lock()
failures = []
ids = []


def work(t):
    session = lib.openSession(slot, flags)
    mechanism = PyKCS11.Mechanism(CKM_ECDSA_SHA256, None)
    for i in range(cycles):
        label = "py-%d-%d" % (t, i)
        try:
            public, private = session.generateKeyPair(
                [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_KEY_TYPE, CKK_EC), (CKA_TOKEN, True),
                 (CKA_EC_PARAMS, P256), (CKA_LABEL, label), (CKA_VERIFY, True)],
                [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_KEY_TYPE, CKK_EC), (CKA_TOKEN, True),
                 (CKA_PRIVATE, True), (CKA_SENSITIVE, True), (CKA_LABEL, label),
                 (CKA_SIGN, True)],
                mecha=PyKCS11.MechanismECGENERATEKEYPAIR,
            )
            signature = session.sign(private, DATA, mechanism)
            if not session.verify(public, DATA, signature, mechanism):
                raise RuntimeError("signature does not verify")
            key_id = bytes(session.getAttributeValue(private, [CKA_ID])[0]).hex()
            with lock:
                ids.append(key_id)
        except Exception as e:  # every failure is counted, none stops the run
            with lock:
                failures.append("%s: %r" % (label, e))
        if progress:
            with lock:
                sys.stderr.write("cycle\n")
                sys.stderr.flush()
    session.closeSession()


workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()

# A private key's value is never given out.
key = first.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, "py-0-0")])[0]
sensitive, value = first.getAttributeValue(key, [CKA_SENSITIVE, CKA_VALUE])
first.logout()
first.closeSession()
print(json.dumps({
    "cycles": threads * cycles,
    "failures": failures,
    "ids": ids,
    "sensitive": bool(sensitive),
    "value": None if value is None else "returned",
}))
