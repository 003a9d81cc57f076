//! `libkeysync_pkcs11.so`: a PKCS#11 module that presents a keysync cluster
//! as one token, so applications that speak PKCS#11 (OpenSC's
//! `pkcs11-tool`, OpenSSL's pkcs11 engine, Java's SunPKCS11, PyKCS11) use
//! the cluster without keysync's SDK.
//!
//! It links the SDK (`keysync`), nothing of the agent. `C_Initialize`
//! reads the TOML file named by `KEYSYNC_PKCS11_CONFIG` ([`config`]),
//! starts the module's own runtime and connects ([`module`]). One slot
//! ([`token`]); its objects are the cluster's token keys ([`objects`]);
//! the mechanisms are what keysync's agents do ([`mechanisms`]); sessions
//! ([`sessions`]) and operations ([`ops`]) are safe Rust. The C interface
//! is [`ffi`], the only module allowed `unsafe`.
#![warn(missing_docs)]

pub mod config;
#[allow(unsafe_code)]
pub mod ffi;
pub mod mechanisms;
pub mod module;
pub mod objects;
pub mod ops;
pub mod sessions;
pub mod token;
