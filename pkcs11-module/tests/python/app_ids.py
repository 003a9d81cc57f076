"""PyKCS11 (unmodified) against libkeysync_pkcs11.so: applications' own
CKA_IDs. In a process that did not make it, findObjects by CKA_ID finds a
key another process made with that id (both halves, which carry the same
id), and it signs; a second pair made with the same id is found beside it
(PKCS#11 allows shared ids); searches by label, class and key type
narrow; a CKA_ID over keysync's 64-byte limit is refused and makes no key.
Prints one JSON line.

Usage: python3 app_ids.py MODULE PIN APP_ID_HEX LABEL
"""

import json
import sys

import PyKCS11
from PyKCS11 import (
    CKA_CLASS, CKA_EC_PARAMS, CKA_ID, CKA_KEY_TYPE, CKA_LABEL, CKA_PRIVATE,
    CKA_SENSITIVE, CKA_SIGN, CKA_TOKEN, CKA_VERIFY, CKF_RW_SESSION,
    CKF_SERIAL_SESSION, CKK_EC, CKK_RSA, CKM_ECDSA_SHA256, CKO_PRIVATE_KEY,
    CKO_PUBLIC_KEY,
)

module, pin, app_id, label = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
P256 = bytes.fromhex("06082a8648ce3d030107")

lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = lib.getSlotList(tokenPresent=True)[0]
session = lib.openSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION)
session.login(pin)
report = {}


def find(template):
    return session.findObjects(template)


def ids_of(objects):
    return sorted(bytes(session.getAttributeValue(o, [CKA_ID])[0]).hex() for o in objects)


def generate(key_id, key_label):
    return session.generateKeyPair(
        [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_KEY_TYPE, CKK_EC), (CKA_TOKEN, True),
         (CKA_EC_PARAMS, P256), (CKA_LABEL, key_label), (CKA_ID, key_id),
         (CKA_VERIFY, True)],
        [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_KEY_TYPE, CKK_EC), (CKA_TOKEN, True),
         (CKA_PRIVATE, True), (CKA_SENSITIVE, True), (CKA_LABEL, key_label),
         (CKA_ID, key_id), (CKA_SIGN, True)],
        mecha=PyKCS11.MechanismECGENERATEKEYPAIR,
    )


# The key another process made: by id alone both halves, by id and class one.
by_id = find([(CKA_ID, app_id)])
report["found_by_id"] = len(by_id)
report["found_ids"] = ids_of(by_id)
private = find([(CKA_ID, app_id), (CKA_CLASS, CKO_PRIVATE_KEY)])
report["private_by_id"] = len(private)
if private:
    report["label"] = str(session.getAttributeValue(private[0], [CKA_LABEL])[0])
    public = find([(CKA_ID, app_id), (CKA_CLASS, CKO_PUBLIC_KEY)])
    sig = session.sign(private[0], b"signed by id", PyKCS11.Mechanism(CKM_ECDSA_SHA256, None))
    report["signature_len"] = len(sig)
    report["verifies"] = bool(public) and session.verify(
        public[0], b"signed by id", sig, PyKCS11.Mechanism(CKM_ECDSA_SHA256, None))

# A second pair under the same id: both are found.
_, twin = generate(app_id, "py-twin")
report["twin_id"] = bytes(session.getAttributeValue(twin, [CKA_ID])[0]).hex()
report["private_after_twin"] = len(find([(CKA_ID, app_id), (CKA_CLASS, CKO_PRIVATE_KEY)]))
report["by_label"] = len(find([(CKA_LABEL, label), (CKA_CLASS, CKO_PRIVATE_KEY)]))
report["by_id_and_ec"] = len(find([(CKA_ID, app_id), (CKA_KEY_TYPE, CKK_EC)]))
report["by_id_and_rsa"] = len(find([(CKA_ID, app_id), (CKA_KEY_TYPE, CKK_RSA)]))
report["other_id"] = len(find([(CKA_ID, app_id + b"\x00")]))

# Over the limit: refused before anything is made.
try:
    generate(b"\x07" * 65, "py-too-long")
    report["too_long"] = None
except PyKCS11.PyKCS11Error as e:
    report["too_long"] = PyKCS11.CKR[e.value]
report["too_long_found"] = len(find([(CKA_LABEL, "py-too-long")]))

print(json.dumps(report))
