//! scripts/torch_variant.sh: the torch build set-up installs for a machine's
//! NVIDIA driver, checked with a fake `nvidia-smi` on the PATH.

use std::path::Path;
use std::process::Command;

/// Runs `snippet` after sourcing the script, with `nvidia-smi` printing
/// `driver` (or failing, or absent) first on the PATH.
fn run(driver: Option<&str>, env: &[(&str, &str)], snippet: &str) -> (bool, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    if let Some(d) = driver {
        let body = match d {
            "fail" => "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n".to_owned(),
            d => format!("#!/bin/sh\necho '{d}'\n"),
        };
        let smi = tmp.path().join("nvidia-smi");
        std::fs::write(&smi, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A PATH with the fake first and no other nvidia-smi (this machine has none).
    let path = format!("{}:/usr/bin:/bin", tmp.path().display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_variant.sh");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "PEFT_RS_TORCH_VERSION=2.11.0; . '{}'; {snippet}",
            script.display()
        ))
        .env_clear()
        .env("PATH", path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// `run` that must succeed: its stdout.
fn stdout_of(driver: Option<&str>, env: &[(&str, &str)], snippet: &str) -> String {
    let (ok, out, err) = run(driver, env, snippet);
    assert!(ok, "{snippet} with driver {driver:?}: {err}");
    out
}

/// `run` that must fail: its stderr.
fn stderr_of(driver: Option<&str>, env: &[(&str, &str)], snippet: &str) -> String {
    let (ok, out, err) = run(driver, env, snippet);
    assert!(!ok, "{snippet} with driver {driver:?} succeeded: {out}");
    err
}

#[test]
fn the_driver_picks_the_torch_build() {
    let cases = [
        (None, "default", "torch-2.11.0"),
        (Some("fail"), "default", "torch-2.11.0"),
        (Some("580.65.06"), "default", "torch-2.11.0"),
        (Some("590.48.01"), "default", "torch-2.11.0"),
        (Some("575.57.08"), "cu128", "torch-2.11.0-cu128"),
        (Some("570.26"), "cu128", "torch-2.11.0-cu128"),
        (Some("550.127.05"), "cu126", "torch-2.11.0-cu126"),
        (Some("525.60.13"), "cu126", "torch-2.11.0-cu126"),
        (Some("470.256.02"), "cpu", "torch-2.11.0-cpu"),
    ];
    for (driver, variant, venv) in cases {
        let (ok, out, err) = run(
            driver,
            &[],
            "v=$(torch_variant) && echo $v $(torch_venv_name $v)",
        );
        assert!(ok, "{driver:?}: {err}");
        assert_eq!(out, format!("{variant} {venv}"), "driver {driver:?}");
        if variant == "cpu" {
            assert!(err.contains("470.256.02") && err.contains("525"), "{err}");
        }
    }
}

#[test]
fn the_install_command_and_its_errors() {
    assert_eq!(
        stdout_of(None, &[], "torch_pip_args default"),
        "torch==2.11.0"
    );
    // A non-default build needs PyTorch's index, and says so when it is not set.
    let err = stderr_of(Some("550.127.05"), &[], "torch_pip_args $(torch_variant)");
    assert!(
        err.contains("cu126") && err.contains("PEFT_RS_TORCH_INDEX") && err.contains("550.127.05"),
        "{err}"
    );
    let out = stdout_of(
        Some("550.127.05"),
        &[("PEFT_RS_TORCH_INDEX", "https://wheels.example/whl/")],
        "torch_pip_args $(torch_variant)",
    );
    assert_eq!(
        out,
        "torch==2.11.0 --index-url https://wheels.example/whl/cu126"
    );
    // The user's choice wins over the driver, and a typo is named.
    let out = stdout_of(
        Some("550.127.05"),
        &[("PEFT_RS_TORCH_VARIANT", "default")],
        "torch_variant",
    );
    assert_eq!(out, "default");
    let err = stderr_of(None, &[("PEFT_RS_TORCH_VARIANT", "cu999")], "torch_variant");
    assert!(err.contains("cu999"), "{err}");
}
