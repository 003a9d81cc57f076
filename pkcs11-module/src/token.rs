//! The library, its one slot (id 0) and the token in it: the cluster.

use cryptoki_sys::*;

use crate::sessions::MAX_SESSIONS;

/// The only slot.
pub const SLOT_ID: CK_SLOT_ID = 0;

/// `text` in a fixed field, padded with spaces (PKCS#11 strings are not
/// NUL-terminated); cut at `N` bytes, on a character boundary.
pub fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let mut end = text.len().min(N);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&text.as_bytes()[..end]);
    out
}

fn version() -> CK_VERSION {
    let minor = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    let major = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    CK_VERSION { major, minor }
}

/// `C_GetInfo`.
pub fn library_info() -> CK_INFO {
    CK_INFO {
        cryptokiVersion: CK_VERSION {
            major: 2,
            minor: 40,
        },
        manufacturerID: padded("keysync"),
        flags: 0,
        libraryDescription: padded("keysync cluster PKCS#11 module"),
        libraryVersion: version(),
    }
}

/// `C_GetSlotInfo`.
pub fn slot_info() -> CK_SLOT_INFO {
    CK_SLOT_INFO {
        slotDescription: padded("keysync cluster"),
        manufacturerID: padded("keysync"),
        flags: CKF_TOKEN_PRESENT | CKF_HW_SLOT,
        hardwareVersion: version(),
        firmwareVersion: version(),
    }
}

/// `C_GetTokenInfo`, with the sessions open now.
pub fn token_info(label: &str, sessions: usize, rw_sessions: usize) -> CK_TOKEN_INFO {
    CK_TOKEN_INFO {
        label: padded(label),
        manufacturerID: padded("keysync"),
        model: padded("cluster"),
        serialNumber: padded("0"),
        flags: CKF_LOGIN_REQUIRED | CKF_TOKEN_INITIALIZED | CKF_RNG | CKF_USER_PIN_INITIALIZED,
        ulMaxSessionCount: MAX_SESSIONS as CK_ULONG,
        ulSessionCount: sessions as CK_ULONG,
        ulMaxRwSessionCount: MAX_SESSIONS as CK_ULONG,
        ulRwSessionCount: rw_sessions as CK_ULONG,
        ulMaxPinLen: 256,
        ulMinPinLen: 1,
        ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
        ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
        ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
        ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
        hardwareVersion: version(),
        firmwareVersion: version(),
        utcTime: [b' '; 16],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_space_padded() {
        let l: [u8; 32] = padded("keysync");
        assert_eq!(&l[..7], b"keysync");
        assert!(l[7..].iter().all(|b| *b == b' '));
        let cut: [u8; 4] = padded("aé€");
        assert_eq!(&cut, b"a\xc3\xa9 ");
    }
}
