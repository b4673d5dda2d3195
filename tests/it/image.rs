//! The container image, checked for real on this machine (docs/contract.md
//! section 5, docs/deploy.md).
//!
//! `the_runtime_image_builds_and_is_configured_as_the_contract_says`: builds
//! the repo's `Dockerfile`, stage `runtime`, with podman. No registry is
//! reachable, so the base is Debian 12 made locally (mmdebstrap, `podman
//! import`, cached in podman's storage as `localhost/outbox-tailer-base:bookworm`)
//! and stands in for `debian:bookworm-slim` (`RUNTIME_BASE`); the binary this
//! test run built stands in for the `builder` stage (`--build-context
//! builder=<dir with out/outbox-tailer>`; Debian's Rust is too old for the
//! real one). The build runs the image's own smoke steps (`outbox-tailer
//! --version`, `outbox-tailer healthcheck --help`, as the image's user); then
//! `podman inspect` and the image's files are checked. Skipped, with the
//! reason printed, only when podman or mmdebstrap cannot be installed.

use crate::common::tools::{install, must, run, Output};
use outbox_testkit::repo_root;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The local stand-in for debian:bookworm-slim (kept: making it takes ~30 s).
const BASE_IMAGE: &str = "localhost/outbox-tailer-base:bookworm";
/// The Dockerfile's `runtime-base` stage, tagged so that its apt layer stays
/// cached between runs.
const RUNTIME_BASE_IMAGE: &str = "localhost/outbox-tailer-runtime-base:container-test";
/// The image under test, removed afterwards (with the layers only it uses).
const IMAGE: &str = "localhost/outbox-tailer:container-test";

/// The Debian 12 base image, made from Debian's packages unless podman
/// already has it.
fn base_image() {
    if run(
        "podman",
        &["image", "exists", BASE_IMAGE],
        Duration::from_secs(60),
    )
    .success
    {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("outbox-tailer-base-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tarball = dir.path().join("bookworm.tar");
    let tarball = tarball.to_str().unwrap();
    must(
        "mmdebstrap",
        &["--variant=minbase", "--quiet", "bookworm", tarball],
        Duration::from_secs(900),
    );
    must(
        "podman",
        &["import", "--quiet", tarball, BASE_IMAGE],
        Duration::from_secs(300),
    );
    eprintln!(
        "container: made {BASE_IMAGE} (mmdebstrap + podman import) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Removes the image under test (and the layers only it uses).
fn remove_image() {
    let _ = run(
        "podman",
        &["image", "unmount", IMAGE],
        Duration::from_secs(60),
    );
    let _ = run(
        "podman",
        &["rmi", "--ignore", IMAGE],
        Duration::from_secs(120),
    );
}

/// Removes the image under test when the test ends, also on a panic.
struct RemoveImage;

impl Drop for RemoveImage {
    fn drop(&mut self) {
        remove_image();
    }
}

fn podman_build(extra: &[&str]) -> Output {
    let dockerfile = repo_root().join("Dockerfile");
    let base = format!("RUNTIME_BASE={BASE_IMAGE}");
    let mut args = vec![
        "build",
        "--isolation",
        "chroot",
        // The OCI format has no HEALTHCHECK; Docker's has.
        "--format",
        "docker",
        "--build-arg",
        &base,
        "-f",
        dockerfile.to_str().unwrap(),
    ];
    args.extend(extra);
    args.push(repo_root().to_str().unwrap());
    must("podman", &args, Duration::from_secs(600))
}

#[test]
fn the_runtime_image_builds_and_is_configured_as_the_contract_says() {
    let started = Instant::now();
    if let Err(reason) = install(&["podman", "mmdebstrap"], &["podman", "mmdebstrap"]) {
        // Straight to stderr: the test harness would swallow a println!.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED image::the_runtime_image_builds_and_is_configured_as_the_contract_says: {reason}"
        );
        return;
    }
    base_image();
    let base_ready = started.elapsed();

    // The binary this test run built, where the `builder` stage puts it
    // (a copy: a concurrent cargo build may replace the original).
    let context = tempfile::Builder::new()
        .prefix("outbox-tailer-builder-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::create_dir(context.path().join("out")).unwrap();
    let staged = context.path().join("out/outbox-tailer");
    std::fs::copy(env!("CARGO_BIN_EXE_outbox-tailer"), &staged).unwrap();

    // A leftover of a killed run would let the build take the smoke steps
    // from the cache instead of running them.
    remove_image();
    let remove = RemoveImage;
    podman_build(&["--target", "runtime-base", "-t", RUNTIME_BASE_IMAGE]);
    let builder = format!("builder={}", context.path().display());
    let build = podman_build(&[
        "--target",
        "runtime",
        "--build-context",
        &builder,
        "-t",
        IMAGE,
    ]);
    let built = started.elapsed();

    // The smoke steps ran inside the image, as its user.
    let version = format!("outbox-tailer {}", env!("CARGO_PKG_VERSION"));
    assert!(
        build.text.lines().any(|l| l.trim() == version),
        "`outbox-tailer --version` did not print {version:?} in the build:\n{}",
        build.text
    );
    assert!(
        build.text.contains("Usage: outbox-tailer healthcheck"),
        "`outbox-tailer healthcheck --help` did not run in the build:\n{}",
        build.text
    );

    // The image's configuration (docs/contract.md section 5).
    let inspect: Value = serde_json::from_str(
        &must(
            "podman",
            &["image", "inspect", IMAGE],
            Duration::from_secs(60),
        )
        .stdout,
    )
    .unwrap();
    let image = &inspect[0];
    let config = &image["Config"];
    let user = config["User"].as_str().unwrap_or("");
    let uid = user.split(':').next().unwrap_or("");
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "the image must run as a numeric non-root user, not {user:?}"
    );
    assert_eq!(config["Entrypoint"], serde_json::json!(["outbox-tailer"]));
    assert_eq!(config["Cmd"], serde_json::json!(["run"]));
    assert_eq!(
        image["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "outbox-tailer", "healthcheck"]),
        "health check in exec form: {}",
        image["Healthcheck"]
    );
    let ports: Vec<&String> = config["ExposedPorts"]
        .as_object()
        .map(|p| p.keys().collect())
        .unwrap_or_default();
    assert_eq!(ports, ["9599/tcp"]);
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"METRICS_ADDR=0.0.0.0:9599"), "{env:?}");
    assert_eq!(image["Os"], "linux");

    // The image's files: the binary, CA roots, the user; nothing of the build.
    let root = PathBuf::from(
        must(
            "podman",
            &["image", "mount", IMAGE],
            Duration::from_secs(60),
        )
        .stdout
        .trim(),
    );
    let installed = std::fs::metadata(root.join("usr/local/bin/outbox-tailer")).unwrap();
    assert_eq!(installed.len(), std::fs::metadata(&staged).unwrap().len());
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(installed.uid(), 0, "the binary belongs to root");
        assert_eq!(
            installed.permissions().mode() & 0o022,
            0,
            "the binary is not writable by its user"
        );
    }
    let certs = std::fs::metadata(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(certs.len() > 10_000, "ca-certificates installed");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)),
        "user {uid} in /etc/passwd:\n{passwd}"
    );
    let os = std::fs::read_to_string(root.join("etc/os-release")).unwrap();
    assert!(os.contains("VERSION_CODENAME=bookworm"), "{os}");
    for leftover in ["usr/local/cargo", "src", "out", "root/.cargo"] {
        assert!(!root.join(leftover).exists(), "{leftover} in the image");
    }
    drop(remove);
    eprintln!(
        "container: base ready after {:.1} s, image built after {:.1} s, done after {:.1} s",
        base_ready.as_secs_f64(),
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
