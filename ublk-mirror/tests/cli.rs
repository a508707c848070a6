//! The `ublk-mirror` binary on the host (no guest): failures an operator sees.
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ublk-mirror");
const MESSAGE: &str = "ublk_drv is not loaded: modprobe ublk_drv (kernel ≥ 6.0 with CONFIG_BLK_DEV_UBLK)";

#[test]
fn features_without_the_driver_fails_with_the_operator_message() {
    let out = Command::new(BIN)
        .args(["features", "--control", "/nonexistent/ublk-control"])
        .env_remove("UBLK_CONTROL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(eac_common::EXIT_USAGE), "{stderr}");
    assert!(stderr.contains(MESSAGE), "{stderr}");
    assert!(stderr.contains("/nonexistent/ublk-control"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn features_on_this_host() {
    let out = Command::new(BIN)
        .args(["features", "--json"])
        .env_remove("UBLK_CONTROL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("this host has ublk_drv: checking the success path instead");
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["features"].is_u64(), "{v}");
    } else {
        assert_eq!(out.status.code(), Some(eac_common::EXIT_USAGE), "{stderr}");
        assert!(stderr.contains(MESSAGE), "{stderr}");
    }
}

#[test]
fn ublk_local_with_a_missing_backing_file_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["ublk-local", "--backing", "/nonexistent/backing.img"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(eac_common::EXIT_USAGE), "{stderr}");
    assert!(
        stderr.contains("cannot open the backing store /nonexistent/backing.img"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no device path may be printed");
}

#[test]
fn ublk_local_recover_needs_an_id() {
    let out = Command::new(BIN)
        .args(["ublk-local", "--backing", "/dev/null", "--recover"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "clap usage error: {stderr}");
    assert!(stderr.contains("--id"), "{stderr}");
}

#[test]
fn ublk_local_without_the_driver_says_so() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this host has ublk_drv (the VM tests cover ublk-local)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ublk-mirror-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backing = dir.join("backing.img");
    std::fs::File::create(&backing).unwrap().set_len(1 << 20).unwrap();
    let out = Command::new(BIN)
        .args(["ublk-local", "--backing"])
        .arg(&backing)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(eac_common::EXIT_USAGE), "{stderr}");
    assert!(stderr.contains(MESSAGE), "{stderr}");
    assert!(out.stdout.is_empty());
}
