"""PyKCS11 (unmodified) against libkeysync_pkcs11.so: what applications do
beyond hash-and-sign. AES-GCM with the application's IV, AAD and tag
length (round trip, the same IV giving the same bytes in another session,
a wrong AAD or a flipped bit refused, parameters keysync lacks refused);
RSA-PSS on a digest (CKM_RSA_PKCS_PSS) and on the message
(CKM_SHA256_RSA_PKCS_PSS), signed and verified, with parameters keysync
lacks refused. Prints one JSON line, with the RSA public key and the PSS
signatures for the caller to check with openssl.

Usage: python3 apps.py MODULE PIN
"""

import hashlib
import json
import sys

import PyKCS11
from PyKCS11 import (
    CKA_CLASS, CKA_ENCRYPT, CKA_DECRYPT, CKA_ID, CKA_KEY_TYPE, CKA_LABEL,
    CKA_MODULUS, CKA_MODULUS_BITS, CKA_PRIVATE, CKA_PUBLIC_EXPONENT,
    CKA_SENSITIVE, CKA_SIGN, CKA_TOKEN, CKA_VALUE_LEN, CKA_VERIFY,
    CKF_RW_SESSION, CKF_SERIAL_SESSION, CKG_MGF1_SHA1, CKG_MGF1_SHA256,
    CKK_AES, CKK_RSA, CKM_AES_KEY_GEN, CKM_RSA_PKCS_KEY_PAIR_GEN,
    CKM_RSA_PKCS_PSS, CKM_SHA256, CKM_SHA256_RSA_PKCS_PSS, CKM_SHA_1,
    CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_SECRET_KEY,
)

module, pin = sys.argv[1], sys.argv[2]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = lib.getSlotList(tokenPresent=True)[0]
flags = CKF_SERIAL_SESSION | CKF_RW_SESSION
session = lib.openSession(slot, flags)
session.login(pin)
other = lib.openSession(slot, flags)
report = {}


def refused(f):
    """The CKR_* name f fails with, or None if it succeeds."""
    try:
        f()
    except PyKCS11.PyKCS11Error as e:
        return PyKCS11.CKR[e.value]
    return None


# AES-GCM.
aes = session.generateKey(
    [(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_TOKEN, True),
     (CKA_PRIVATE, True), (CKA_SENSITIVE, True), (CKA_VALUE_LEN, 32),
     (CKA_LABEL, "py-gcm"), (CKA_ENCRYPT, True), (CKA_DECRYPT, True)],
    mecha=PyKCS11.Mechanism(CKM_AES_KEY_GEN, None),
)
report["aes_id"] = bytes(session.getAttributeValue(aes, [CKA_ID])[0]).hex()
iv = bytes(range(12))
aad = b"record header v1"
plaintext = b"an application's record, sealed under its own IV" * 3
gcm = PyKCS11.AES_GCM_Mechanism(iv, aad, 128)
sealed = bytes(session.encrypt(aes, plaintext, gcm))
report["gcm_len"] = len(sealed)
report["gcm_round_trip"] = bytes(session.decrypt(aes, sealed, gcm)) == plaintext
# Same key, IV, AAD from another session (the module routes it anew): the
# same bytes, as GCM is deterministic.
found = other.findObjects([(CKA_CLASS, CKO_SECRET_KEY), (CKA_LABEL, "py-gcm")])
report["gcm_same_bytes"] = bytes(other.encrypt(found[0], plaintext, gcm)) == sealed
short = PyKCS11.AES_GCM_Mechanism(iv, aad, 96)
sealed96 = bytes(session.encrypt(aes, plaintext, short))
report["gcm96_len"] = len(sealed96)
report["gcm96_is_prefix"] = sealed96 == sealed[:len(plaintext) + 12]
report["gcm96_round_trip"] = bytes(session.decrypt(aes, sealed96, short)) == plaintext
report["gcm_wrong_aad"] = refused(
    lambda: session.decrypt(aes, sealed, PyKCS11.AES_GCM_Mechanism(iv, b"other", 128)))
flipped = bytearray(sealed)
flipped[5] ^= 1
report["gcm_flipped"] = refused(lambda: session.decrypt(aes, bytes(flipped), gcm))
report["gcm_iv16"] = refused(
    lambda: session.encrypt(aes, plaintext, PyKCS11.AES_GCM_Mechanism(bytes(16), aad, 128)))
report["gcm_tag64"] = refused(
    lambda: session.encrypt(aes, plaintext, PyKCS11.AES_GCM_Mechanism(iv, aad, 64)))

# RSA-PSS.
public, private = session.generateKeyPair(
    [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_KEY_TYPE, CKK_RSA), (CKA_TOKEN, True),
     (CKA_MODULUS_BITS, 2048), (CKA_PUBLIC_EXPONENT, (1, 0, 1)),
     (CKA_LABEL, "py-pss"), (CKA_VERIFY, True)],
    [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_KEY_TYPE, CKK_RSA), (CKA_TOKEN, True),
     (CKA_PRIVATE, True), (CKA_SENSITIVE, True), (CKA_LABEL, "py-pss"),
     (CKA_SIGN, True)],
    mecha=PyKCS11.Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None),
)
report["rsa_id"] = bytes(session.getAttributeValue(private, [CKA_ID])[0]).hex()
modulus, exponent = session.getAttributeValue(public, [CKA_MODULUS, CKA_PUBLIC_EXPONENT])
report["modulus"] = bytes(modulus).hex()
report["exponent"] = bytes(exponent).hex()
message = b"signed with RSA-PSS through PKCS#11"
digest = hashlib.sha256(message).digest()
pss = PyKCS11.RSA_PSS_Mechanism(CKM_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA256, 32)
signature = bytes(session.sign(private, digest, pss))
report["pss"] = signature.hex()
report["pss_verifies"] = bool(session.verify(public, digest, signature, pss))
report["pss_other_digest"] = bool(
    session.verify(public, hashlib.sha256(b"x").digest(), signature, pss))
pss_msg = PyKCS11.RSA_PSS_Mechanism(CKM_SHA256_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA256, 32)
signature2 = bytes(other.sign(
    other.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, "py-pss")])[0],
    message, pss_msg))
report["pss_message"] = signature2.hex()
report["pss_message_verifies"] = bool(session.verify(public, message, signature2, pss_msg))
report["message"] = message.hex()
report["pss_sha1"] = refused(lambda: session.sign(
    private, hashlib.sha1(message).digest(),
    PyKCS11.RSA_PSS_Mechanism(CKM_RSA_PKCS_PSS, CKM_SHA_1, CKG_MGF1_SHA1, 20)))
report["pss_mgf_mismatch"] = refused(lambda: session.sign(
    private, digest, PyKCS11.RSA_PSS_Mechanism(CKM_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA1, 32)))
report["pss_short_digest"] = refused(lambda: session.sign(private, digest[:20], pss))

session.logout()
session.closeSession()
other.closeSession()
print(json.dumps(report))
