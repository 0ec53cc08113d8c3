//! The vhost-user capability file each program ships (`<crate>/vhost-user/50-<program>.json`,
//! installed under /usr/share/qemu/vhost-user/ for QEMU and libvirt to discover), checked
//! against QEMU's schema (docs/interop/vhost-user.json, `VhostUserBackend`) and against the
//! program's own `--print-capabilities`.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// `VHostUserBackendType` in QEMU's schema.
const BACKEND_TYPES: [&str; 15] = [
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];

/// `VHostUserBackendBlockFeature` in QEMU's schema.
const BLOCK_FEATURES: [&str; 2] = ["read-only", "blk-file"];

/// Checks `file` (a `VhostUserBackend`) and `bin --print-capabilities` (a
/// `VHostUserBackendCapabilities`) against the schema and against each other: the same
/// type, and a binary path that ends in the program's name.
pub fn check(bin: &str, file: &Path, program: &str) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let doc: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", file.display()));
    let obj = doc.as_object().expect("a VhostUserBackend object");
    for k in obj.keys() {
        assert!(
            matches!(k.as_str(), "description" | "type" | "binary" | "tags"),
            "{}: member {k} is not in the schema",
            file.display()
        );
    }
    assert!(obj["description"].is_string(), "description");
    let ty = obj["type"].as_str().expect("type is a string");
    assert!(
        BACKEND_TYPES.contains(&ty),
        "type {ty} is not a VHostUserBackendType"
    );
    let binary = obj["binary"].as_str().expect("binary is a string");
    assert!(
        binary.starts_with('/') && Path::new(binary).file_name() == Some(program.as_ref()),
        "binary {binary} is not an absolute path to {program}"
    );
    if let Some(tags) = obj.get("tags") {
        let tags = tags.as_array().expect("tags is an array");
        assert!(tags.iter().all(Value::is_string), "tags are strings");
    }

    let out = Command::new(bin)
        .arg("--print-capabilities")
        .output()
        .expect("run --print-capabilities");
    assert!(out.status.success());
    let caps: Value = serde_json::from_slice(&out.stdout).expect("capabilities are JSON");
    assert_eq!(
        caps["type"], ty,
        "--print-capabilities and the file disagree on the type"
    );
    for k in caps.as_object().expect("an object").keys() {
        assert!(matches!(k.as_str(), "type" | "features"), "member {k}");
    }
    if let Some(f) = caps.get("features") {
        assert_eq!(
            ty, "block",
            "only block (and input, gpu) capabilities have features"
        );
        for f in f.as_array().expect("features is an array") {
            let f = f.as_str().expect("a feature is a string");
            assert!(BLOCK_FEATURES.contains(&f), "{f} is not a block feature");
        }
    }
}
