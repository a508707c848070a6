//! ublk in the 6.12 guest: the driver is there and `ublk-mirror features` talks to it.
//! One guest boot (≈ 5 s under TCG) carries all the checks.
use std::time::{Duration, Instant};

use eac_lab::ublk_guest::{UblkGuest, build_workspace_bin, shell_quote, skip_reason};
use ublk_mirror::sys;

#[test]
#[ignore = "vm: boots the 6.12 guest; run by scripts/test.sh"]
fn guest_driver_advertises_the_6_12_features() {
    // An ignored test run on purpose (scripts/test.sh, after setup.sh) must not pass
    // without the guest: fail with the reason instead of returning early.
    if let Some(why) = skip_reason() {
        panic!("the ublk guest cannot run here: {why} (run scripts/setup.sh)");
    }
    let t0 = Instant::now();
    let bin = build_workspace_bin("ublk-mirror", "ublk-mirror").expect("build ublk-mirror");
    let bin = shell_quote(bin.to_str().expect("utf-8 path"));
    let built = t0.elapsed();

    // Results go to files in the share (the cwd); the console is for humans.
    let script = format!(
        r#"
        set -u
        uname -r > uname
        if [ -c /dev/ublk-control ]; then echo present > control; else echo missing > control; fi
        {bin} features --json > features.json 2> features.err; echo $? > features.rc
        {bin} features --control /dev/ublk-control-absent > /dev/null 2> absent.err
        echo $? > absent.rc
        "#
    );
    let run = UblkGuest::new()
        .timeout(Duration::from_secs(180))
        .run_script(&script)
        .expect("run guest");
    eprintln!("guest run: {:.1?} wall (cargo build check {built:.1?})", run.wall);
    assert_eq!(run.status, Some(0), "{}", run.transcript());

    let read = |f: &str| run.read(f).unwrap_or_else(|e| panic!("{f}: {e}\n{}", run.transcript()));
    assert_eq!(read("uname").trim(), "6.12.107+deb12-amd64");
    assert_eq!(read("control").trim(), "present", "/dev/ublk-control in the guest");
    assert_eq!(
        read("features.rc").trim(),
        "0",
        "features failed: {}",
        read("features.err")
    );

    let v: serde_json::Value = serde_json::from_str(&read("features.json"))
        .unwrap_or_else(|e| panic!("features --json is not JSON ({e}): {}", read("features.json")));
    assert_eq!(v["control"], "/dev/ublk-control");
    let bits = v["features"].as_u64().expect("features is a u64");
    let names: Vec<&str> = v["names"]
        .as_array()
        .expect("names array")
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    eprintln!("guest ublk_drv features {bits:#x}: {names:?}");
    for (flag, name) in [
        (sys::UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
        (sys::UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
        (sys::UBLK_F_USER_COPY, "USER_COPY"),
        (sys::UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    ] {
        assert_ne!(bits & flag, 0, "{name} missing from {bits:#x}");
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    // Names and bits describe the same set.
    assert_eq!(names.len() as u32, bits.count_ones(), "{names:?} vs {bits:#x}");

    // A missing control node: non-zero exit, the operator's message.
    assert_eq!(read("absent.rc").trim(), "64", "{}", read("absent.err"));
    assert!(
        read("absent.err").contains("ublk_drv is not loaded: modprobe ublk_drv"),
        "{}",
        read("absent.err")
    );
}
