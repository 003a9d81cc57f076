//! The C interface: every `C_*` function of PKCS#11 2.40, exported by name
//! and through `C_GetFunctionList`. This is the crate's only `unsafe` code.
//!
//! Each entry point catches panics (`CKR_GENERAL_ERROR`), checks every
//! pointer (null where a value is needed is `CKR_ARGUMENTS_BAD`) and
//! length, follows the two-call protocol for outputs (a null buffer asks
//! for the length; a short one is `CKR_BUFFER_TOO_SMALL` with the length
//! needed), and hands safe values to [`crate::module`] and [`crate::ops`].
//!
//! What the unsafe code relies on is the caller's side of the PKCS#11
//! contract: a non-null pointer points to what the function's signature
//! says (with a length, that many elements), valid and not used by another
//! thread for the duration of the call.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
// The safety contract of every function is PKCS#11's, stated above.
#![allow(clippy::missing_safety_doc)]
#![allow(non_snake_case)]
// Each `C_*` function is the one of that name in PKCS#11 2.40.
#![allow(missing_docs)]

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cryptoki_sys::*;

use crate::mechanisms::{self, Param, OFFERED};
use crate::module;
use crate::objects::Attr;
use crate::ops::{self, Template};
use crate::token::{self, SLOT_ID};

/// Most attributes in one template.
const MAX_TEMPLATE: usize = 256;
/// Largest attribute value accepted in a template.
const MAX_ATTRIBUTE: usize = 64 * 1024;
/// Most bytes of one `C_GenerateRandom`.
const MAX_RANDOM: usize = 1 << 20;

/// Runs an entry point: its error code, or `CKR_GENERAL_ERROR` if it
/// panicked (a panic must never unwind into C).
fn guard(f: impl FnOnce() -> Result<(), CK_RV>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// `len` elements at `p` (none when `len` is 0, whatever `p` is).
unsafe fn input<'a, T>(p: *const T, len: CK_ULONG) -> Result<&'a [T], CK_RV> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() || !p.is_aligned() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let n = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    if n.checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: `p` is non-null and aligned, the size fits in isize, and the
    // caller promises `len` valid elements there for the call (PKCS#11).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// `len` writable elements at `p`.
unsafe fn input_mut<'a, T>(p: *mut T, len: CK_ULONG) -> Result<&'a mut [T], CK_RV> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() || !p.is_aligned() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let n = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    if n.checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: as in `input`; the caller also promises the elements are
    // writable and not aliased during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// The value an output pointer points to.
unsafe fn output<'a, T>(p: *mut T) -> Result<&'a mut T, CK_RV> {
    if !p.is_aligned() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: a non-null output pointer points to a writable `T` for the
    // call (PKCS#11); `as_mut` turns null into `None`.
    unsafe { p.as_mut() }.ok_or(CKR_ARGUMENTS_BAD)
}

/// Gives `items` back by the two-call protocol: `out` null → the length in
/// `*out_len`; `*out_len` too small → `CKR_BUFFER_TOO_SMALL` and the length.
unsafe fn give<T: Copy>(items: &[T], out: *mut T, out_len: *mut CK_ULONG) -> Result<(), CK_RV> {
    // SAFETY: the caller passes this function's own arguments through.
    let len = unsafe { output(out_len) }?;
    let need = items.len() as CK_ULONG;
    if out.is_null() {
        *len = need;
        return Ok(());
    }
    if *len < need {
        *len = need;
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `out` has room for `*len` >= `need` elements (PKCS#11).
    unsafe { input_mut(out, need) }?.copy_from_slice(items);
    *len = need;
    Ok(())
}

/// A template the application passes in.
unsafe fn template(
    p: *const CK_ATTRIBUTE,
    n: CK_ULONG,
) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>, CK_RV> {
    // SAFETY: `p` and `n` are the application's template and count.
    let attributes = unsafe { input(p, n) }?;
    if attributes.len() > MAX_TEMPLATE {
        return Err(CKR_ARGUMENTS_BAD);
    }
    attributes
        .iter()
        .map(|a| {
            // SAFETY: each attribute's value pointer and length describe
            // its value (PKCS#11).
            let value = unsafe { input(a.pValue as *const u8, a.ulValueLen) }?;
            if value.len() > MAX_ATTRIBUTE {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            Ok((a.type_, value.to_vec()))
        })
        .collect()
}

/// A mechanism's type, and whether it came with a parameter.
unsafe fn mechanism(p: *const CK_MECHANISM) -> Result<(CK_MECHANISM_TYPE, bool), CK_RV> {
    if !p.is_aligned() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: a non-null mechanism pointer points to a CK_MECHANISM.
    let m = unsafe { p.as_ref() }.ok_or(CKR_ARGUMENTS_BAD)?;
    Ok((m.mechanism, !m.pParameter.is_null() && m.ulParameterLen > 0))
}

/// Most bytes of a GCM IV read from a parameter (keysync takes 12; a
/// longer one is refused after reading, not read unbounded).
const MAX_IV: usize = 256;

/// A mechanism's type and its parameter, read by the type: a
/// `CK_RSA_PKCS_PSS_PARAMS` for the PSS mechanisms, a `CK_GCM_PARAMS` for
/// `CKM_AES_GCM` (each only at its exact size); anything else given is
/// [`Param::Other`], which the mechanism then refuses.
unsafe fn mechanism_param(p: *const CK_MECHANISM) -> Result<(CK_MECHANISM_TYPE, Param), CK_RV> {
    if !p.is_aligned() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: a non-null mechanism pointer points to a CK_MECHANISM.
    let m = unsafe { p.as_ref() }.ok_or(CKR_ARGUMENTS_BAD)?;
    if m.pParameter.is_null() || m.ulParameterLen == 0 {
        return Ok((m.mechanism, Param::None));
    }
    let len = usize::try_from(m.ulParameterLen).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    let param = match m.mechanism {
        CKM_RSA_PKCS_PSS | CKM_SHA256_RSA_PKCS_PSS
            if len == std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>() =>
        {
            let pp = m.pParameter as *const CK_RSA_PKCS_PSS_PARAMS;
            if !pp.is_aligned() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // SAFETY: non-null, aligned, and the caller says it holds a
            // CK_RSA_PKCS_PSS_PARAMS (its length is that struct's).
            let pss = unsafe { &*pp };
            Param::Pss {
                hash_alg: pss.hashAlg,
                mgf: pss.mgf,
                s_len: pss.sLen,
            }
        }
        CKM_AES_GCM if len == std::mem::size_of::<CK_GCM_PARAMS>() => {
            let gp = m.pParameter as *const CK_GCM_PARAMS;
            if !gp.is_aligned() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // SAFETY: non-null, aligned, and the caller says it holds a
            // CK_GCM_PARAMS (its length is that struct's).
            let gcm = unsafe { &*gp };
            if usize::try_from(gcm.ulIvLen).map_or(true, |n| n > MAX_IV)
                || usize::try_from(gcm.ulAADLen).map_or(true, |n| n > ops::MAX_DATA)
            {
                return Err(CKR_MECHANISM_PARAM_INVALID);
            }
            // SAFETY: the IV and its length, as the parameter gives them.
            let iv = unsafe { input(gcm.pIv.cast_const(), gcm.ulIvLen) }?;
            // SAFETY: the AAD and its length, as the parameter gives them.
            let aad = unsafe { input(gcm.pAAD.cast_const(), gcm.ulAADLen) }?;
            Param::Gcm(keysync_schemas::GcmParams {
                iv: iv.to_vec(),
                aad: aad.to_vec(),
                tag_bits: u32::try_from(gcm.ulTagBits).unwrap_or(u32::MAX),
            })
        }
        _ => Param::Other,
    };
    Ok((m.mechanism, param))
}

fn check_slot(slot: CK_SLOT_ID) -> Result<(), CK_RV> {
    if slot == SLOT_ID {
        Ok(())
    } else {
        Err(CKR_SLOT_ID_INVALID)
    }
}

#[no_mangle]
pub unsafe extern "C" fn C_Initialize(p_init_args: *mut c_void) -> CK_RV {
    guard(|| {
        let p = p_init_args as *const CK_C_INITIALIZE_ARGS;
        if !p.is_aligned() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: a non-null pInitArgs points to a CK_C_INITIALIZE_ARGS.
        if let Some(args) = unsafe { p.as_ref() } {
            if !args.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let given = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ]
            .into_iter()
            .filter(|g| *g)
            .count();
            if given != 0 && given != 4 {
                return Err(CKR_ARGUMENTS_BAD);
            }
            if args.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS != 0 {
                return Err(CKR_NEED_TO_CREATE_THREADS);
            }
            // The module locks with the OS's primitives; it cannot use the
            // application's.
            if given == 4 && args.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(CKR_CANT_LOCK);
            }
        }
        module::initialize()
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_Finalize(p_reserved: *mut c_void) -> CK_RV {
    guard(|| {
        if !p_reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        module::finalize()
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetInfo(p_info: *mut CK_INFO) -> CK_RV {
    guard(|| {
        module::get()?;
        // SAFETY: pInfo is this function's output.
        *unsafe { output(p_info) }? = token::library_info();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(pp: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        // SAFETY: ppFunctionList is this function's output. The list is
        // never written through the pointer (PKCS#11 callers only read it).
        *unsafe { output(pp) }? = std::ptr::addr_of!(FUNCTIONS).cast_mut();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetSlotList(
    _token_present: CK_BBOOL,
    p_slot_list: *mut CK_SLOT_ID,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        module::get()?;
        // SAFETY: this function's list and count.
        unsafe { give(&[SLOT_ID], p_slot_list, pul_count) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, p_info: *mut CK_SLOT_INFO) -> CK_RV {
    guard(|| {
        module::get()?;
        check_slot(slot)?;
        // SAFETY: pInfo is this function's output.
        *unsafe { output(p_info) }? = token::slot_info();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, p_info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        check_slot(slot)?;
        let (sessions, rw) = m.session_counts();
        // SAFETY: pInfo is this function's output.
        *unsafe { output(p_info) }? = token::token_info(&m.config.token_label, sessions, rw);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    p_list: *mut CK_MECHANISM_TYPE,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        module::get()?;
        check_slot(slot)?;
        let list: Vec<CK_MECHANISM_TYPE> = OFFERED.iter().map(|o| o.mechanism).collect();
        // SAFETY: this function's list and count.
        unsafe { give(&list, p_list, pul_count) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    p_info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard(|| {
        module::get()?;
        check_slot(slot)?;
        let o = mechanisms::info(mechanism)?;
        // SAFETY: pInfo is this function's output.
        *unsafe { output(p_info) }? = CK_MECHANISM_INFO {
            ulMinKeySize: o.min,
            ulMaxKeySize: o.max,
            flags: o.flags,
        };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    ph_session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        check_slot(slot)?;
        // SAFETY: phSession is this function's output.
        let out = unsafe { output(ph_session) }?;
        *out = m.open_session(flags)?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_CloseSession(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| module::get()?.close_session(h))
}

#[no_mangle]
pub unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        check_slot(slot)?;
        m.close_all_sessions();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GetSessionInfo(
    h: CK_SESSION_HANDLE,
    p_info: *mut CK_SESSION_INFO,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        let s = m.session_info(h)?;
        // SAFETY: pInfo is this function's output.
        *unsafe { output(p_info) }? = CK_SESSION_INFO {
            slotID: SLOT_ID,
            state: s.state,
            flags: s.flags,
            ulDeviceError: 0,
        };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_Login(
    h: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    p_pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the PIN and its length.
        let pin = unsafe { input(p_pin, pin_len) }?;
        m.login(h, user, pin)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_Logout(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| module::get()?.logout(h))
}

#[no_mangle]
pub unsafe extern "C" fn C_GenerateKeyPair(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    p_public: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    p_private: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    ph_public: *mut CK_OBJECT_HANDLE,
    ph_private: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: this function's mechanism, templates and outputs.
        let (mech, param) = unsafe { mechanism(p_mechanism) }?;
        // SAFETY: as above.
        let public: Vec<_> = unsafe { template(p_public, public_count) }?;
        // SAFETY: as above.
        let private: Vec<_> = unsafe { template(p_private, private_count) }?;
        // SAFETY: as above.
        let out_public = unsafe { output(ph_public) }?;
        // SAFETY: as above.
        let out_private = unsafe { output(ph_private) }?;
        m.check_session(h)?;
        if param {
            mechanisms::key_pair_type(mech)?;
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        let (pubh, privh) = m.generate_key_pair(h, mech, &public, &private)?;
        *out_public = pubh;
        *out_private = privh;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GenerateKey(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    p_template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    ph_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: this function's mechanism, template and output.
        let (mech, param) = unsafe { mechanism(p_mechanism) }?;
        // SAFETY: as above.
        let t: Vec<_> = unsafe { template(p_template, count) }?;
        // SAFETY: as above.
        let out = unsafe { output(ph_key) }?;
        m.check_session(h)?;
        if param {
            mechanisms::key_type(mech)?;
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        *out = m.generate_key(h, mech, &t)?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_DestroyObject(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard(|| module::get()?.destroy_object(h, object))
}

#[no_mangle]
pub unsafe extern "C" fn C_GetAttributeValue(
    h: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    p_template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the application's template, whose lengths we update.
        let attributes = unsafe { input_mut(p_template, count) }?;
        if attributes.len() > MAX_TEMPLATE {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let types: Vec<CK_ATTRIBUTE_TYPE> = attributes.iter().map(|a| a.type_).collect();
        let values = m.attributes(h, object, &types)?;
        let mut rv = CKR_OK;
        let mut fail = |code: CK_RV, a: &mut CK_ATTRIBUTE| {
            a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
            if rv == CKR_OK {
                rv = code;
            }
        };
        for (a, value) in attributes.iter_mut().zip(values) {
            match value {
                Attr::Value(v) if a.pValue.is_null() => a.ulValueLen = v.len() as CK_ULONG,
                Attr::Value(v) if (a.ulValueLen as u128) < v.len() as u128 => {
                    fail(CKR_BUFFER_TOO_SMALL, a)
                }
                Attr::Value(v) => {
                    // SAFETY: pValue has room for ulValueLen >= v.len() bytes.
                    unsafe { input_mut(a.pValue as *mut u8, v.len() as CK_ULONG) }?
                        .copy_from_slice(&v);
                    a.ulValueLen = v.len() as CK_ULONG;
                }
                Attr::Sensitive => fail(CKR_ATTRIBUTE_SENSITIVE, a),
                Attr::Invalid => fail(CKR_ATTRIBUTE_TYPE_INVALID, a),
            }
        }
        if rv == CKR_OK {
            Ok(())
        } else {
            Err(rv)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_FindObjectsInit(
    h: CK_SESSION_HANDLE,
    p_template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the search template.
        let t: Vec<_> = unsafe { template(p_template, count) }?;
        let t: &Template = &t;
        m.find_init(h, t)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_FindObjects(
    h: CK_SESSION_HANDLE,
    ph_objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the count output.
        let count = unsafe { output(pul_count) }?;
        if ph_objects.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: room for `max` handles.
        let out = unsafe { input_mut(ph_objects, max) }?;
        let found = m.find(h, out.len())?;
        out[..found.len()].copy_from_slice(&found);
        *count = found.len() as CK_ULONG;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_FindObjectsFinal(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| module::get()?.find_final(h))
}

unsafe fn operation_init(
    h: CK_SESSION_HANDLE,
    verify: bool,
    p_mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: this function's mechanism.
        let (mech, param) = unsafe { mechanism_param(p_mechanism) }?;
        m.operation_init(h, verify, mech, &param, key)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_SignInit(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { operation_init(h, false, p_mechanism, key) }
}

/// Signs (`data` given: `C_Sign`; none: `C_SignFinal`), by the two-call
/// protocol: the length is known before anything is signed.
unsafe fn sign(
    h: CK_SESSION_HANDLE,
    data: Option<(*const u8, CK_ULONG)>,
    p_signature: *mut u8,
    pul_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        let data = match data {
            // SAFETY: the data to sign and its length.
            Some((p, n)) => unsafe { input(p, n) }?,
            None => &[],
        };
        // SAFETY: the signature length output.
        let len = unsafe { output(pul_len) }?;
        let need = m.signature_len(h)?;
        if p_signature.is_null() {
            *len = need as CK_ULONG;
            return Ok(());
        }
        if (*len as u128) < need as u128 {
            *len = need as CK_ULONG;
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        let signature = m.sign(h, data)?;
        // SAFETY: the signature buffer, with room for *len >= need bytes.
        unsafe { give(&signature, p_signature, pul_len) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_Sign(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_signature: *mut CK_BYTE,
    pul_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe {
        sign(
            h,
            Some((p_data.cast_const(), data_len)),
            p_signature,
            pul_len,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn C_SignUpdate(
    h: CK_SESSION_HANDLE,
    p_part: *mut CK_BYTE,
    part_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the part and its length.
        let part = unsafe { input(p_part, part_len) }?;
        m.operation_update(h, false, part)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_SignFinal(
    h: CK_SESSION_HANDLE,
    p_signature: *mut CK_BYTE,
    pul_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { sign(h, None, p_signature, pul_len) }
}

#[no_mangle]
pub unsafe extern "C" fn C_VerifyInit(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { operation_init(h, true, p_mechanism, key) }
}

#[no_mangle]
pub unsafe extern "C" fn C_Verify(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_signature: *mut CK_BYTE,
    signature_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the data and its length.
        let data = unsafe { input(p_data, data_len) }?;
        // SAFETY: the signature and its length.
        let signature = unsafe { input(p_signature, signature_len) }?;
        m.verify(h, data, signature)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_VerifyUpdate(
    h: CK_SESSION_HANDLE,
    p_part: *mut CK_BYTE,
    part_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the part and its length.
        let part = unsafe { input(p_part, part_len) }?;
        m.operation_update(h, true, part)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_VerifyFinal(
    h: CK_SESSION_HANDLE,
    p_signature: *mut CK_BYTE,
    signature_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the signature and its length.
        let signature = unsafe { input(p_signature, signature_len) }?;
        m.verify(h, &[], signature)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_GenerateRandom(
    h: CK_SESSION_HANDLE,
    p_out: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        if usize::try_from(len).map_or(true, |n| n > MAX_RANDOM) {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: room for `len` bytes.
        let out = unsafe { input_mut(p_out, len) }?;
        m.random(h, out)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_SeedRandom(
    h: CK_SESSION_HANDLE,
    p_seed: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        m.check_session(h)?;
        // SAFETY: the seed and its length.
        unsafe { input(p_seed, len) }?;
        Err(CKR_RANDOM_SEED_NOT_SUPPORTED)
    })
}

/// The operations no mechanism of the token does (digests): starting one
/// names a mechanism the token lacks; the rest find no operation under way.
unsafe fn no_mechanism(h: CK_SESSION_HANDLE, p_mechanism: *mut CK_MECHANISM) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        m.check_session(h)?;
        // SAFETY: the mechanism argument of the calling entry point.
        unsafe { mechanism(p_mechanism) }?;
        Err(CKR_MECHANISM_INVALID)
    })
}

fn no_operation(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        module::get()?.check_session(h)?;
        Err(CKR_OPERATION_NOT_INITIALIZED)
    })
}

unsafe fn crypt_init(
    h: CK_SESSION_HANDLE,
    decrypt: bool,
    p_mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        m.check_session(h)?;
        // SAFETY: this function's mechanism.
        let (mech, param) = unsafe { mechanism_param(p_mechanism) }?;
        m.crypt_init(h, decrypt, mech, &param, key)
    })
}

/// Ends an encryption or decryption (`data` given: `C_Encrypt`/
/// `C_Decrypt`; none: `*Final`) by the two-call protocol: GCM's output
/// length is known from the input, so a length query or a short buffer
/// asks no HSM and leaves the operation under way.
unsafe fn crypt(
    h: CK_SESSION_HANDLE,
    decrypt: bool,
    data: Option<(*const u8, CK_ULONG)>,
    p_out: *mut u8,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        let data = match data {
            // SAFETY: the input and its length.
            Some((p, n)) => unsafe { input(p, n) }?,
            None => &[],
        };
        // SAFETY: the output length.
        let len = unsafe { output(pul_out) }?;
        let need = m.crypt_output_len(h, decrypt, data.len())?;
        if p_out.is_null() {
            *len = need as CK_ULONG;
            return Ok(());
        }
        if (*len as u128) < need as u128 {
            *len = need as CK_ULONG;
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        let out = m.crypt(h, decrypt, data)?;
        // SAFETY: the output buffer, with room for *len >= need bytes.
        unsafe { give(&out, p_out, pul_out) }
    })
}

/// `C_EncryptUpdate`/`C_DecryptUpdate`: buffers the part; nothing comes
/// out until the end (GCM is sealed and opened whole on the HSM).
unsafe fn crypt_update(
    h: CK_SESSION_HANDLE,
    decrypt: bool,
    p_part: *const u8,
    part_len: CK_ULONG,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::get()?;
        // SAFETY: the part and its length.
        let part = unsafe { input(p_part, part_len) }?;
        // SAFETY: the output length.
        let len = unsafe { output(pul_out) }?;
        m.crypt_update(h, decrypt, part)?;
        *len = 0;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_EncryptInit(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { crypt_init(h, false, p_mechanism, key) }
}

#[no_mangle]
pub unsafe extern "C" fn C_Encrypt(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_out: *mut CK_BYTE,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe {
        crypt(
            h,
            false,
            Some((p_data.cast_const(), data_len)),
            p_out,
            pul_out,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn C_EncryptUpdate(
    h: CK_SESSION_HANDLE,
    p_part: *mut CK_BYTE,
    part_len: CK_ULONG,
    _p_out: *mut CK_BYTE,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { crypt_update(h, false, p_part.cast_const(), part_len, pul_out) }
}

#[no_mangle]
pub unsafe extern "C" fn C_EncryptFinal(
    h: CK_SESSION_HANDLE,
    p_out: *mut CK_BYTE,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { crypt(h, false, None, p_out, pul_out) }
}

#[no_mangle]
pub unsafe extern "C" fn C_DecryptInit(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { crypt_init(h, true, p_mechanism, key) }
}

#[no_mangle]
pub unsafe extern "C" fn C_Decrypt(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_out: *mut CK_BYTE,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe {
        crypt(
            h,
            true,
            Some((p_data.cast_const(), data_len)),
            p_out,
            pul_out,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn C_DecryptUpdate(
    h: CK_SESSION_HANDLE,
    p_part: *mut CK_BYTE,
    part_len: CK_ULONG,
    _p_out: *mut CK_BYTE,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { crypt_update(h, true, p_part.cast_const(), part_len, pul_out) }
}

#[no_mangle]
pub unsafe extern "C" fn C_DecryptFinal(
    h: CK_SESSION_HANDLE,
    p_out: *mut CK_BYTE,
    pul_out: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { crypt(h, true, None, p_out, pul_out) }
}

#[no_mangle]
pub unsafe extern "C" fn C_DigestInit(
    h: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
) -> CK_RV {
    // SAFETY: passes this function's arguments through.
    unsafe { no_mechanism(h, p_mechanism) }
}

/// Entry points whose operation never starts here: `CKR_OPERATION_NOT_INITIALIZED`.
macro_rules! never_started {
    ($($name:ident($($ty:ty),*);)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(h: CK_SESSION_HANDLE $(, _: $ty)*) -> CK_RV {
            no_operation(h)
        }
    )*};
}

never_started! {
    C_Digest(*mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestUpdate(*mut CK_BYTE, CK_ULONG);
    C_DigestKey(CK_OBJECT_HANDLE);
    C_DigestFinal(*mut CK_BYTE, *mut CK_ULONG);
}

/// Entry points the module does not implement: `CKR_FUNCTION_NOT_SUPPORTED`
/// (once initialised), as PKCS#11 says a module that lacks one must.
macro_rules! not_supported {
    ($($name:ident($($ty:ty),*);)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name($(_: $ty),*) -> CK_RV {
            guard(|| {
                module::get()?;
                Err(CKR_FUNCTION_NOT_SUPPORTED)
            })
        }
    )*};
}

not_supported! {
    C_InitToken(CK_SLOT_ID, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR);
    C_InitPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG);
    C_SetPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR, CK_ULONG);
    C_GetOperationState(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_SetOperationState(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE);
    C_CreateObject(CK_SESSION_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_CopyObject(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_GetObjectSize(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ULONG);
    C_SetAttributeValue(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG);
    C_SignRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_SignRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_VerifyRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_VerifyRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptDigestUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_SignEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptVerifyUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_WrapKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_UnwrapKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_DeriveKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_WaitForSlotEvent(CK_FLAGS, *mut CK_SLOT_ID, *mut c_void);
}

/// Legacy parallel-function calls: `CKR_FUNCTION_NOT_PARALLEL`, as the spec
/// has every module answer.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionStatus(_h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        module::get()?;
        Err(CKR_FUNCTION_NOT_PARALLEL)
    })
}

#[no_mangle]
pub unsafe extern "C" fn C_CancelFunction(_h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        module::get()?;
        Err(CKR_FUNCTION_NOT_PARALLEL)
    })
}

/// The function list `C_GetFunctionList` hands out (PKCS#11 2.40).
static FUNCTIONS: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};
