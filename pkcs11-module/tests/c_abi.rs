//! The raw C ABI of `libkeysync_pkcs11.so`, loaded as an application
//! loads it (dlopen, `C_GetFunctionList`), in front of a real two-HSM
//! stack: bad input gets the right `CKR_*` code and never a crash (calls
//! before `C_Initialize`, null pointers, short buffers, unknown
//! mechanisms, a closed session, an unknown configuration key), the
//! two-call length protocol holds, and 8 threads with a session each
//! create and at once sign with fresh keys with zero failures.
#![allow(unsafe_code)] // calling a C ABI is what this test is for

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

use cryptoki_sys::*;
use keysync_testkit::{find_binary, start_stack};

struct Module {
    f: &'static CK_FUNCTION_LIST,
    _lib: libloading::Library,
}

/// Calls one entry of the function list.
macro_rules! call {
    ($m:expr, $name:ident $(, $arg:expr)*) => {{
        let f = $m.f.$name.expect(stringify!($name));
        // SAFETY: the module's own entry point, called with arguments that
        // are valid or deliberately null/short (what is under test).
        unsafe { f($($arg),*) }
    }};
}

fn load() -> Module {
    let path = find_binary("libkeysync_pkcs11.so")
        .unwrap_or_else(|e| panic!("{e}: build it with `cargo build -p keysync-pkcs11`"));
    // SAFETY: loading our own module runs no initialiser with preconditions.
    let lib = unsafe { libloading::Library::new(&path) }.expect("dlopen");
    // SAFETY: the symbol has this type (PKCS#11 `C_GetFunctionList`).
    let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { lib.get(b"C_GetFunctionList") }.expect("C_GetFunctionList");
    // SAFETY: null is a bad argument the function must refuse.
    assert_eq!(unsafe { get(null_mut()) }, CKR_ARGUMENTS_BAD);
    let mut list: *mut CK_FUNCTION_LIST = null_mut();
    // SAFETY: a valid output pointer.
    assert_eq!(unsafe { get(&mut list) }, CKR_OK);
    // SAFETY: the module returned a pointer to its static function list,
    // valid while the library stays loaded (it lives in `Module`).
    let f: &'static CK_FUNCTION_LIST = unsafe { &*list };
    assert_eq!((f.version.major, f.version.minor), (2, 40));
    Module { f, _lib: lib }
}

fn attr<T>(t: CK_ATTRIBUTE_TYPE, v: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: t,
        pValue: v as *const T as *mut c_void,
        ulValueLen: std::mem::size_of::<T>() as CK_ULONG,
    }
}

/// An attribute to be read into `v`.
fn out_attr<T>(t: CK_ATTRIBUTE_TYPE, v: &mut T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: t,
        pValue: v as *mut T as *mut c_void,
        ulValueLen: std::mem::size_of::<T>() as CK_ULONG,
    }
}

fn bytes_attr(t: CK_ATTRIBUTE_TYPE, v: &[u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: t,
        pValue: v.as_ptr() as *mut c_void,
        ulValueLen: v.len() as CK_ULONG,
    }
}

fn mech(m: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m,
        pParameter: null_mut(),
        ulParameterLen: 0,
    }
}

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Generates a P-256 pair labelled `label`: (public, private).
fn p256_pair(
    m: &Module,
    h: CK_SESSION_HANDLE,
    label: &str,
) -> (CK_RV, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
    let yes: CK_BBOOL = CK_TRUE;
    let public = [
        bytes_attr(CKA_EC_PARAMS, &P256),
        bytes_attr(CKA_LABEL, label.as_bytes()),
        attr(CKA_VERIFY, &yes),
    ];
    let private = [
        bytes_attr(CKA_LABEL, label.as_bytes()),
        attr(CKA_SIGN, &yes),
        attr(CKA_SENSITIVE, &yes),
    ];
    let mut mechanism = mech(CKM_EC_KEY_PAIR_GEN);
    let (mut pubh, mut privh) = (0, 0);
    let rv = call!(
        m,
        C_GenerateKeyPair,
        h,
        &mut mechanism,
        public.as_ptr() as *mut _,
        public.len() as CK_ULONG,
        private.as_ptr() as *mut _,
        private.len() as CK_ULONG,
        &mut pubh,
        &mut privh
    );
    (rv, pubh, privh)
}

/// Signs `data` with ECDSA-SHA256 in one call.
fn sign(
    m: &Module,
    h: CK_SESSION_HANDLE,
    key: CK_OBJECT_HANDLE,
    data: &[u8],
) -> Result<Vec<u8>, CK_RV> {
    let mut mechanism = mech(CKM_ECDSA_SHA256);
    let rv = call!(m, C_SignInit, h, &mut mechanism, key);
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut sig = vec![0u8; 64];
    let mut len: CK_ULONG = 64;
    let rv = call!(
        m,
        C_Sign,
        h,
        data.as_ptr() as *mut u8,
        data.len() as CK_ULONG,
        sig.as_mut_ptr(),
        &mut len
    );
    if rv != CKR_OK {
        return Err(rv);
    }
    sig.truncate(len as usize);
    Ok(sig)
}

fn verify(
    m: &Module,
    h: CK_SESSION_HANDLE,
    key: CK_OBJECT_HANDLE,
    data: &[u8],
    sig: &[u8],
) -> CK_RV {
    let mut mechanism = mech(CKM_ECDSA_SHA256);
    let rv = call!(m, C_VerifyInit, h, &mut mechanism, key);
    if rv != CKR_OK {
        return rv;
    }
    call!(
        m,
        C_Verify,
        h,
        data.as_ptr() as *mut u8,
        data.len() as CK_ULONG,
        sig.as_ptr() as *mut u8,
        sig.len() as CK_ULONG
    )
}

fn open(m: &Module) -> CK_SESSION_HANDLE {
    let mut h = 0;
    let rv = call!(
        m,
        C_OpenSession,
        0,
        CKF_SERIAL_SESSION | CKF_RW_SESSION,
        null_mut(),
        None,
        &mut h
    );
    assert_eq!(rv, CKR_OK);
    h
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("config");
    p
}

#[test]
fn the_c_abi_refuses_bad_input_and_serves_many_threads() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stack = rt.block_on(start_stack(2));
    let dir = tempfile::tempdir().expect("dir");
    let urls: Vec<String> = stack.url().split(',').map(|u| format!("{u:?}")).collect();
    let good = write_config(
        dir.path(),
        "good.toml",
        &format!(
            "nats = [{}]\nuser_pin = \"1234\"\ntoken_label = \"abi\"\n",
            urls.join(",")
        ),
    );
    let unknown = write_config(
        dir.path(),
        "unknown.toml",
        &format!(
            "nats = [{}]\nuser_pin = \"1234\"\nuser_pni = \"x\"\n",
            urls.join(",")
        ),
    );
    let m = load();

    // Before C_Initialize.
    let mut n: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetSlotList, 0, null_mut(), &mut n),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    let mut h = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession,
            0,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            &mut h
        ),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(
        call!(m, C_Sign, 1, null_mut(), 0, null_mut(), null_mut()),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(
        call!(m, C_CreateObject, 1, null_mut(), 0, null_mut()),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(
        call!(m, C_Finalize, null_mut()),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );

    // C_Initialize: bad arguments, a bad configuration, then a good one.
    let mut reserved = 0u8;
    let mut bad_args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: &mut reserved as *mut u8 as *mut c_void,
    };
    let bad_args = &mut bad_args as *mut CK_C_INITIALIZE_ARGS as *mut c_void;
    assert_eq!(call!(m, C_Initialize, bad_args), CKR_ARGUMENTS_BAD);
    let mut args = CK_C_INITIALIZE_ARGS {
        pReserved: null_mut(),
        ..CK_C_INITIALIZE_ARGS::default()
    };
    args.flags = CKF_OS_LOCKING_OK;
    let args_ptr = &mut args as *mut CK_C_INITIALIZE_ARGS as *mut c_void;
    std::env::remove_var("KEYSYNC_PKCS11_CONFIG");
    assert_eq!(call!(m, C_Initialize, args_ptr), CKR_GENERAL_ERROR);
    std::env::set_var("KEYSYNC_PKCS11_CONFIG", &unknown);
    assert_eq!(call!(m, C_Initialize, args_ptr), CKR_GENERAL_ERROR);
    std::env::set_var("KEYSYNC_PKCS11_CONFIG", &good);
    assert_eq!(call!(m, C_Initialize, args_ptr), CKR_OK);
    assert_eq!(
        call!(m, C_Initialize, null_mut()),
        CKR_CRYPTOKI_ALREADY_INITIALIZED
    );

    // Slots and the two-call protocol.
    assert_eq!(
        call!(m, C_GetSlotList, 0, null_mut(), null_mut()),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_GetSlotList, 0, null_mut(), &mut n), CKR_OK);
    assert_eq!(n, 1);
    let mut slots = [99 as CK_SLOT_ID; 1];
    n = 0;
    assert_eq!(
        call!(m, C_GetSlotList, 1, slots.as_mut_ptr(), &mut n),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(n, 1);
    assert_eq!(
        call!(m, C_GetSlotList, 1, slots.as_mut_ptr(), &mut n),
        CKR_OK
    );
    assert_eq!(slots, [0]);
    // SAFETY: CK_TOKEN_INFO is plain data; all zeroes is a valid value.
    let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(m, C_GetTokenInfo, 0, null_mut()), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(m, C_GetTokenInfo, 7, &mut info), CKR_SLOT_ID_INVALID);
    assert_eq!(call!(m, C_GetTokenInfo, 0, &mut info), CKR_OK);
    assert_eq!(&info.label[..4], b"abi ");
    assert!(info.label[3..].iter().all(|b| *b == b' '));
    assert_ne!(info.flags & CKF_LOGIN_REQUIRED, 0);

    n = 0;
    assert_eq!(call!(m, C_GetMechanismList, 0, null_mut(), &mut n), CKR_OK);
    let count = n;
    assert!(count >= 7);
    let mut mechanisms = vec![0 as CK_MECHANISM_TYPE; count as usize];
    n = 2;
    assert_eq!(
        call!(m, C_GetMechanismList, 0, mechanisms.as_mut_ptr(), &mut n),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(n, count);
    assert_eq!(
        call!(m, C_GetMechanismList, 0, mechanisms.as_mut_ptr(), &mut n),
        CKR_OK
    );
    assert!(mechanisms.contains(&CKM_ECDSA_SHA256));
    let mut mi = CK_MECHANISM_INFO {
        ulMinKeySize: 0,
        ulMaxKeySize: 0,
        flags: 0,
    };
    for unknown in [
        CKM_SHA1_RSA_PKCS,
        CKM_AES_CBC,
        CKM_RSA_PKCS_OAEP,
        0x8000_1234,
    ] {
        assert_eq!(
            call!(m, C_GetMechanismInfo, 0, unknown, &mut mi),
            CKR_MECHANISM_INVALID
        );
    }
    assert_eq!(
        call!(m, C_GetMechanismInfo, 0, CKM_AES_GCM, &mut mi),
        CKR_OK
    );
    assert_eq!(
        mi.flags & (CKF_ENCRYPT | CKF_DECRYPT),
        CKF_ENCRYPT | CKF_DECRYPT
    );
    assert_eq!(
        call!(m, C_GetMechanismInfo, 0, CKM_RSA_PKCS, &mut mi),
        CKR_OK
    );
    assert_eq!(mi.flags & CKF_DECRYPT, 0, "RSA-PKCS signs only");
    for digest_mechanism in [
        CKM_ECDSA,
        CKM_RSA_PKCS,
        CKM_RSA_PKCS_PSS,
        CKM_SHA256_RSA_PKCS_PSS,
    ] {
        assert!(
            mechanisms.contains(&digest_mechanism),
            "{digest_mechanism:#x}"
        );
    }

    // Sessions and login.
    assert_eq!(
        call!(m, C_OpenSession, 0, 0, null_mut(), None, &mut h),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_eq!(
        call!(
            m,
            C_OpenSession,
            0,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            null_mut()
        ),
        CKR_ARGUMENTS_BAD
    );
    let h = open(&m);
    assert_eq!(
        call!(m, C_Login, h, CKU_USER, null_mut(), 4),
        CKR_ARGUMENTS_BAD
    );
    let wrong = *b"4321";
    assert_eq!(
        call!(m, C_Login, h, CKU_USER, wrong.as_ptr() as *mut u8, 4),
        CKR_PIN_INCORRECT
    );
    let (rv, _, _) = p256_pair(&m, h, "before-login");
    assert_eq!(rv, CKR_USER_NOT_LOGGED_IN);
    let pin = *b"1234";
    assert_eq!(
        call!(m, C_Login, h, CKU_USER, pin.as_ptr() as *mut u8, 4),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_Login, h, CKU_USER, pin.as_ptr() as *mut u8, 4),
        CKR_USER_ALREADY_LOGGED_IN
    );

    // Key generation: bad mechanisms, then a key, signing at once.
    let mut no_such = mech(CKM_DSA_KEY_PAIR_GEN);
    let (mut a, mut b) = (0, 0);
    assert_eq!(
        call!(
            m,
            C_GenerateKeyPair,
            h,
            null_mut(),
            null_mut(),
            0,
            null_mut(),
            0,
            &mut a,
            &mut b
        ),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(
            m,
            C_GenerateKeyPair,
            h,
            &mut no_such,
            null_mut(),
            0,
            null_mut(),
            0,
            &mut a,
            &mut b
        ),
        CKR_MECHANISM_INVALID
    );
    assert_eq!(
        call!(
            m,
            C_GenerateKeyPair,
            h,
            &mut no_such,
            null_mut(),
            1,
            null_mut(),
            0,
            &mut a,
            &mut b
        ),
        CKR_ARGUMENTS_BAD,
        "a template count with a null template"
    );
    let (rv, pubh, privh) = p256_pair(&m, h, "abi-key");
    assert_eq!(rv, CKR_OK);
    let data = b"abi data";
    for unknown in [CKM_SHA1_RSA_PKCS, CKM_ECDSA_SHA1, 0x8000_4321] {
        let mut mechanism = mech(unknown);
        assert_eq!(
            call!(m, C_SignInit, h, &mut mechanism, privh),
            CKR_MECHANISM_INVALID
        );
    }
    // A mechanism of another key type, a parameter where none is taken,
    // PSS without its parameters or with a struct of the wrong size.
    let mut rsa_pkcs = mech(CKM_RSA_PKCS);
    assert_eq!(
        call!(m, C_SignInit, h, &mut rsa_pkcs, privh),
        CKR_KEY_TYPE_INCONSISTENT
    );
    let junk = [0u8; 24];
    let mut with_param = CK_MECHANISM {
        mechanism: CKM_ECDSA,
        pParameter: junk.as_ptr() as *mut c_void,
        ulParameterLen: junk.len() as CK_ULONG,
    };
    assert_eq!(
        call!(m, C_SignInit, h, &mut with_param, privh),
        CKR_MECHANISM_PARAM_INVALID
    );
    let mut pss_bare = mech(CKM_RSA_PKCS_PSS);
    assert_eq!(
        call!(m, C_SignInit, h, &mut pss_bare, privh),
        CKR_MECHANISM_PARAM_INVALID
    );
    with_param.mechanism = CKM_RSA_PKCS_PSS;
    with_param.ulParameterLen = 7;
    assert_eq!(
        call!(m, C_SignInit, h, &mut with_param, privh),
        CKR_MECHANISM_PARAM_INVALID
    );
    // CKM_ECDSA on a digest: the two-call protocol, then a signature that
    // is ECDSA-SHA256 of the message; a digest of no hash's length is
    // CKR_DATA_LEN_RANGE and ends the operation.
    let digest = {
        use sha2::Digest as _;
        sha2::Sha256::digest(data)
    };
    let mut ecdsa_raw = mech(CKM_ECDSA);
    assert_eq!(call!(m, C_SignInit, h, &mut ecdsa_raw, privh), CKR_OK);
    let (gp, gl) = (digest.as_ptr() as *mut u8, digest.len() as CK_ULONG);
    let mut raw_len: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_Sign, h, gp, gl, null_mut(), &mut raw_len),
        CKR_OK
    );
    assert_eq!(raw_len, 64);
    let mut raw_sig = [0u8; 64];
    assert_eq!(
        call!(m, C_Sign, h, gp, gl, raw_sig.as_mut_ptr(), &mut raw_len),
        CKR_OK
    );
    assert_eq!(verify(&m, h, pubh, data, &raw_sig), CKR_OK);
    assert_eq!(call!(m, C_SignInit, h, &mut ecdsa_raw, privh), CKR_OK);
    assert_eq!(
        call!(m, C_Sign, h, gp, gl - 1, raw_sig.as_mut_ptr(), &mut raw_len),
        CKR_DATA_LEN_RANGE
    );
    assert_eq!(
        call!(m, C_Sign, h, gp, gl, raw_sig.as_mut_ptr(), &mut raw_len),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut ecdsa = mech(CKM_ECDSA_SHA256);
    assert_eq!(
        call!(m, C_SignInit, h, null_mut(), privh),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_SignInit, h, &mut ecdsa, pubh),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    assert_eq!(
        call!(m, C_SignInit, h, &mut ecdsa, 987_654),
        CKR_KEY_HANDLE_INVALID
    );
    assert_eq!(call!(m, C_SignInit, h, &mut ecdsa, privh), CKR_OK);
    assert_eq!(
        call!(m, C_SignInit, h, &mut ecdsa, privh),
        CKR_OPERATION_ACTIVE
    );
    let mut len: CK_ULONG = 0;
    let dp = data.as_ptr() as *mut u8;
    let dl = data.len() as CK_ULONG;
    assert_eq!(call!(m, C_Sign, h, dp, dl, null_mut(), &mut len), CKR_OK);
    assert_eq!(len, 64);
    let mut sig = [0u8; 64];
    len = 10;
    assert_eq!(
        call!(m, C_Sign, h, dp, dl, sig.as_mut_ptr(), &mut len),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 64);
    assert_eq!(
        call!(m, C_Sign, h, null_mut(), 5, sig.as_mut_ptr(), &mut len),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_Sign, h, dp, dl, sig.as_mut_ptr(), null_mut()),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_Sign, h, dp, dl, sig.as_mut_ptr(), &mut len),
        CKR_OK
    );
    assert_eq!(len, 64);
    assert_eq!(
        call!(m, C_Sign, h, dp, dl, sig.as_mut_ptr(), &mut len),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(verify(&m, h, pubh, data, &sig), CKR_OK);
    let mut bad = sig;
    bad[40] ^= 1;
    assert_eq!(verify(&m, h, pubh, data, &bad), CKR_SIGNATURE_INVALID);
    assert_eq!(
        verify(&m, h, pubh, data, &sig[..63]),
        CKR_SIGNATURE_LEN_RANGE
    );

    // Multi-part: the same message in two parts verifies in one.
    assert_eq!(call!(m, C_SignInit, h, &mut ecdsa, privh), CKR_OK);
    assert_eq!(call!(m, C_SignUpdate, h, dp, 3), CKR_OK);
    assert_eq!(
        call!(m, C_SignUpdate, h, dp.wrapping_add(3), dl - 3),
        CKR_OK
    );
    len = 0;
    assert_eq!(call!(m, C_SignFinal, h, null_mut(), &mut len), CKR_OK);
    assert_eq!(len, 64);
    assert_eq!(call!(m, C_SignFinal, h, sig.as_mut_ptr(), &mut len), CKR_OK);
    assert_eq!(verify(&m, h, pubh, data, &sig), CKR_OK);

    // Attributes: sensitive, lengths, short buffers.
    let mut template = [
        CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_EC_PARAMS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
    ];
    assert_eq!(
        call!(m, C_GetAttributeValue, h, privh, template.as_mut_ptr(), 2),
        CKR_ATTRIBUTE_SENSITIVE
    );
    assert_eq!(template[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(template[1].ulValueLen, P256.len() as CK_ULONG);
    let mut point = [0u8; 67];
    let mut short = [CK_ATTRIBUTE {
        type_: CKA_EC_POINT,
        pValue: point.as_mut_ptr() as *mut c_void,
        ulValueLen: 10,
    }];
    assert_eq!(
        call!(m, C_GetAttributeValue, h, pubh, short.as_mut_ptr(), 1),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    short[0].ulValueLen = 67;
    assert_eq!(
        call!(m, C_GetAttributeValue, h, pubh, short.as_mut_ptr(), 1),
        CKR_OK
    );
    assert_eq!(short[0].ulValueLen, 67);
    assert_eq!(
        &point[..3],
        &[0x04, 65, 0x04],
        "an OCTET STRING holding an uncompressed point"
    );
    assert_eq!(
        call!(m, C_GetAttributeValue, h, pubh, null_mut(), 1),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_GetAttributeValue, h, 424_242, template.as_mut_ptr(), 2),
        CKR_OBJECT_HANDLE_INVALID
    );

    // Search by label.
    let mut found = [0 as CK_OBJECT_HANDLE; 8];
    assert_eq!(
        call!(m, C_FindObjects, h, found.as_mut_ptr(), 8, &mut n),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let label = bytes_attr(CKA_LABEL, b"abi-key");
    let search = [label];
    assert_eq!(
        call!(m, C_FindObjectsInit, h, search.as_ptr() as *mut _, 1),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_FindObjectsInit, h, search.as_ptr() as *mut _, 1),
        CKR_OPERATION_ACTIVE
    );
    assert_eq!(
        call!(m, C_FindObjects, h, null_mut(), 8, &mut n),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_FindObjects, h, found.as_mut_ptr(), 8, &mut n),
        CKR_OK
    );
    let mut handles = found[..n as usize].to_vec();
    handles.sort_unstable();
    let mut pair = vec![pubh, privh];
    pair.sort_unstable();
    assert_eq!(handles, pair);
    assert_eq!(
        call!(m, C_FindObjects, h, found.as_mut_ptr(), 8, &mut n),
        CKR_OK
    );
    assert_eq!(n, 0);
    assert_eq!(call!(m, C_FindObjectsFinal, h), CKR_OK);
    assert_eq!(
        call!(m, C_FindObjectsFinal, h),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // Search by a public-key value (fetched from an HSM for the search).
    let by_point = [bytes_attr(CKA_EC_POINT, &point)];
    assert_eq!(
        call!(m, C_FindObjectsInit, h, by_point.as_ptr() as *mut _, 1),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_FindObjects, h, found.as_mut_ptr(), 8, &mut n),
        CKR_OK
    );
    assert_eq!(&found[..n as usize], &[pubh]);
    assert_eq!(call!(m, C_FindObjectsFinal, h), CKR_OK);

    // AES-GCM with the application's CK_GCM_PARAMS.
    let mut aes: CK_OBJECT_HANDLE = 0;
    let mut aes_gen = mech(CKM_AES_KEY_GEN);
    assert_eq!(
        call!(m, C_GenerateKey, h, &mut aes_gen, null_mut(), 0, &mut aes),
        CKR_OK
    );
    let mut iv = [3u8; 12];
    let aad = *b"aad";
    let mut params = CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: aad.as_ptr() as *mut u8,
        ulAADLen: 3,
        ulTagBits: 128,
    };
    let gcm_mech = |p: &mut CK_GCM_PARAMS, len: usize| CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: p as *mut CK_GCM_PARAMS as *mut c_void,
        ulParameterLen: len as CK_ULONG,
    };
    let full = std::mem::size_of::<CK_GCM_PARAMS>();
    let mut gcm = gcm_mech(&mut params, full);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut gcm, privh),
        CKR_KEY_TYPE_INCONSISTENT
    );
    let mut bare = mech(CKM_AES_GCM);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut bare, aes),
        CKR_MECHANISM_PARAM_INVALID
    );
    let mut truncated = gcm_mech(&mut params, full - 8);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut truncated, aes),
        CKR_MECHANISM_PARAM_INVALID
    );
    params.pIv = null_mut();
    let mut no_iv = gcm_mech(&mut params, full);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut no_iv, aes),
        CKR_ARGUMENTS_BAD
    );
    params.pIv = iv.as_mut_ptr();
    params.ulTagBits = 64;
    let mut short_tag = gcm_mech(&mut params, full);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut short_tag, aes),
        CKR_MECHANISM_PARAM_INVALID
    );
    params.ulTagBits = 128;
    assert_eq!(
        call!(m, C_Encrypt, h, dp, dl, null_mut(), &mut len),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut gcm = gcm_mech(&mut params, full);
    assert_eq!(call!(m, C_EncryptInit, h, &mut gcm, aes), CKR_OK);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut gcm, aes),
        CKR_OPERATION_ACTIVE
    );
    len = 0;
    assert_eq!(call!(m, C_Encrypt, h, dp, dl, null_mut(), &mut len), CKR_OK);
    assert_eq!(len, dl + 16);
    let mut sealed = vec![0u8; data.len() + 16];
    len = 4;
    assert_eq!(
        call!(m, C_Encrypt, h, dp, dl, sealed.as_mut_ptr(), &mut len),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, dl + 16);
    assert_eq!(
        call!(m, C_Encrypt, h, dp, dl, sealed.as_mut_ptr(), &mut len),
        CKR_OK
    );
    // Multi-part gives the same bytes (same key, IV, AAD): nothing comes
    // out of the updates, everything at the end.
    assert_eq!(call!(m, C_EncryptInit, h, &mut gcm, aes), CKR_OK);
    let mut part_len: CK_ULONG = 99;
    let mut scratch = [0u8; 64];
    assert_eq!(
        call!(
            m,
            C_EncryptUpdate,
            h,
            dp,
            3,
            scratch.as_mut_ptr(),
            &mut part_len
        ),
        CKR_OK
    );
    assert_eq!(part_len, 0);
    assert_eq!(
        call!(
            m,
            C_EncryptUpdate,
            h,
            dp.wrapping_add(3),
            dl - 3,
            scratch.as_mut_ptr(),
            &mut part_len
        ),
        CKR_OK
    );
    part_len = scratch.len() as CK_ULONG;
    assert_eq!(
        call!(m, C_EncryptFinal, h, scratch.as_mut_ptr(), &mut part_len),
        CKR_OK
    );
    assert_eq!(&scratch[..part_len as usize], &sealed[..]);
    let (sp, sl) = (sealed.as_mut_ptr(), sealed.len() as CK_ULONG);
    assert_eq!(call!(m, C_DecryptInit, h, &mut gcm, aes), CKR_OK);
    len = 0;
    assert_eq!(call!(m, C_Decrypt, h, sp, sl, null_mut(), &mut len), CKR_OK);
    assert_eq!(len, dl);
    let mut opened = vec![0u8; data.len()];
    assert_eq!(
        call!(m, C_Decrypt, h, sp, sl, opened.as_mut_ptr(), &mut len),
        CKR_OK
    );
    assert_eq!(&opened[..], data);
    sealed[0] ^= 1;
    assert_eq!(call!(m, C_DecryptInit, h, &mut gcm, aes), CKR_OK);
    len = opened.len() as CK_ULONG;
    assert_eq!(
        call!(m, C_Decrypt, h, sp, sl, opened.as_mut_ptr(), &mut len),
        CKR_ENCRYPTED_DATA_INVALID
    );
    assert_eq!(call!(m, C_DecryptInit, h, &mut gcm, aes), CKR_OK);
    assert_eq!(
        call!(m, C_Decrypt, h, sp, 15, opened.as_mut_ptr(), &mut len),
        CKR_ENCRYPTED_DATA_LEN_RANGE,
        "shorter than its tag"
    );
    assert_eq!(
        call!(m, C_Decrypt, h, sp, sl, opened.as_mut_ptr(), &mut len),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // What the token does not do.
    let mut cbc = mech(CKM_AES_CBC);
    assert_eq!(
        call!(m, C_EncryptInit, h, &mut cbc, aes),
        CKR_MECHANISM_INVALID
    );
    assert_eq!(
        call!(m, C_CreateObject, h, null_mut(), 0, null_mut()),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    assert_eq!(
        call!(m, C_SeedRandom, h, dp, dl),
        CKR_RANDOM_SEED_NOT_SUPPORTED
    );
    assert_eq!(
        call!(m, C_GenerateRandom, h, null_mut(), 16),
        CKR_ARGUMENTS_BAD
    );
    let mut random = [0u8; 32];
    assert_eq!(
        call!(m, C_GenerateRandom, h, random.as_mut_ptr(), 32),
        CKR_OK
    );
    assert_ne!(random, [0u8; 32]);

    // Many threads, a session each: create, then sign at once.
    let keep = open(&m);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (m, failures) = (&m, &failures);
            s.spawn(move || {
                let h = open(m);
                for i in 0..5 {
                    let (rv, pubh, privh) = p256_pair(m, h, &format!("thread-{t}-{i}"));
                    let ok = rv == CKR_OK
                        && sign(m, h, privh, b"threads")
                            .is_ok_and(|sig| verify(m, h, pubh, b"threads", &sig) == CKR_OK);
                    if !ok {
                        eprintln!("thread {t} cycle {i}: generate rv {rv:#x}");
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                assert_eq!(call!(m, C_CloseSession, h), CKR_OK);
            });
        }
    });
    assert_eq!(failures.into_inner(), 0, "create-then-sign cycles failed");

    // A session object: on one HSM, found while its session lives, gone
    // from the HSM when the session closes.
    let hs = open(&m);
    let no: CK_BBOOL = CK_FALSE;
    let session_public = [
        bytes_attr(CKA_EC_PARAMS, &P256),
        bytes_attr(CKA_LABEL, b"abi-session"),
        attr(CKA_TOKEN, &no),
    ];
    let session_private = [bytes_attr(CKA_LABEL, b"abi-session"), attr(CKA_TOKEN, &no)];
    let mut gen = mech(CKM_EC_KEY_PAIR_GEN);
    let (mut spub, mut spriv) = (0, 0);
    assert_eq!(
        call!(
            m,
            C_GenerateKeyPair,
            hs,
            &mut gen,
            session_public.as_ptr() as *mut _,
            3,
            session_private.as_ptr() as *mut _,
            2,
            &mut spub,
            &mut spriv
        ),
        CKR_OK
    );
    let sig = sign(&m, hs, spriv, b"session").expect("a session key signs");
    assert_eq!(verify(&m, hs, spub, b"session", &sig), CKR_OK);
    let mut token_flag: CK_BBOOL = CK_TRUE;
    let mut read = [out_attr(CKA_TOKEN, &mut token_flag)];
    assert_eq!(
        call!(m, C_GetAttributeValue, hs, spriv, read.as_mut_ptr(), 1),
        CKR_OK
    );
    assert_eq!(token_flag, CK_FALSE);
    let session_search = [attr(CKA_TOKEN, &no)];
    assert_eq!(
        call!(
            m,
            C_FindObjectsInit,
            h,
            session_search.as_ptr() as *mut _,
            1
        ),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_FindObjects, h, found.as_mut_ptr(), 8, &mut n),
        CKR_OK
    );
    let mut session_handles = found[..n as usize].to_vec();
    session_handles.sort_unstable();
    let mut expected = vec![spub, spriv];
    expected.sort_unstable();
    assert_eq!(session_handles, expected);
    assert_eq!(call!(m, C_FindObjectsFinal, h), CKR_OK);
    let session_key = {
        let mut id = [0u8; 16];
        let mut read_id = [out_attr(CKA_ID, &mut id)];
        assert_eq!(
            call!(m, C_GetAttributeValue, hs, spriv, read_id.as_mut_ptr(), 1),
            CKR_OK
        );
        keysync_schemas::KeyId(uuid::Uuid::from_bytes(id))
    };
    let holders: Vec<_> = rt.block_on(async {
        let mut holders = Vec::new();
        for hsm in stack.hsm_ids() {
            let keys = stack.client().list_keys(&hsm).await.expect("list");
            if keys.iter().any(|k| k.key_id == session_key && k.session) {
                holders.push(hsm);
            }
        }
        holders
    });
    assert_eq!(holders.len(), 1, "a session object lives on one HSM");
    assert_eq!(call!(m, C_CloseSession, hs), CKR_OK);
    assert_eq!(sign(&m, h, spriv, b"session"), Err(CKR_KEY_HANDLE_INVALID));
    let still_there = rt.block_on(async {
        let keys = stack.client().list_keys(&holders[0]).await.expect("list");
        keys.iter().any(|k| k.key_id == session_key)
    });
    assert!(
        !still_there,
        "closing the session deleted its session object"
    );

    // A closed session.
    assert_eq!(call!(m, C_CloseSession, h), CKR_OK);
    assert_eq!(call!(m, C_CloseSession, h), CKR_SESSION_HANDLE_INVALID);
    assert_eq!(
        call!(m, C_SignInit, h, &mut ecdsa, privh),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_Login, h, CKU_USER, pin.as_ptr() as *mut u8, 4),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_FindObjectsInit, h, search.as_ptr() as *mut _, 1),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_GenerateRandom, h, random.as_mut_ptr(), 32),
        CKR_SESSION_HANDLE_INVALID
    );
    let mut si = CK_SESSION_INFO::default();
    assert_eq!(
        call!(m, C_GetSessionInfo, h, &mut si),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(call!(m, C_GetSessionInfo, keep, &mut si), CKR_OK);
    assert_eq!(si.state, CKS_RW_USER_FUNCTIONS);

    // Finalize, and initialise again.
    assert_eq!(call!(m, C_Finalize, args_ptr), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(m, C_Finalize, null_mut()), CKR_OK);
    assert_eq!(
        call!(m, C_GetSessionInfo, keep, &mut si),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(call!(m, C_Initialize, null_mut()), CKR_OK);
    assert_eq!(
        call!(m, C_GetSessionInfo, keep, &mut si),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(call!(m, C_Finalize, null_mut()), CKR_OK);

    rt.block_on(stack.shutdown());
}
