//! Writes `schemas/json/*.v1.json` from the Rust types
//! (`keysync_schemas::lifecycle::json_schemas`).
//!
//! ```text
//! cargo run -p keysync-schemas --example gen-json-schemas
//! ```
//!
//! The test `json_schemas` fails while the checked-in files differ from
//! what this writes.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    std::fs::create_dir_all(&dir)?;
    for (file, schema) in keysync_schemas::lifecycle::json_schemas() {
        let path = dir.join(&file);
        std::fs::write(&path, keysync_schemas::lifecycle::pretty(&schema))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
