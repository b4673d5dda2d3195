//! External tools run from the repository root with a deadline (podman,
//! docker-compose, kubectl, promtool, validators), and YAML read through
//! PyYAML: for the tests that check the repo's files with real tools.

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_testkit::repo_root;

/// A finished command: success, and stdout + stderr.
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub text: String,
}

/// Runs `program args` under coreutils' `timeout` (TERM, then KILL 10 s
/// later), so no step can hang the test.
pub fn run(program: &str, args: &[&str], limit: Duration) -> Output {
    run_in(program, args, limit, None)
}

pub fn run_in(program: &str, args: &[&str], limit: Duration, stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=10", &format!("{}", limit.as_secs())])
        .arg(program)
        .args(args)
        .current_dir(repo_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    if output.status.code() == Some(124) {
        panic!("{program} {args:?} did not finish within {limit:?}:\n{text}");
    }
    Output {
        success: output.status.success(),
        stdout,
        text,
    }
}

/// [`run`], failing the test with the tool's output unless it succeeds.
pub fn must(program: &str, args: &[&str], limit: Duration) -> Output {
    let output = run(program, args, limit);
    assert!(
        output.success,
        "{program} {} failed:\n{}",
        args.join(" "),
        output.text
    );
    output
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Every document of a YAML stream, as JSON, read by `python`'s PyYAML
/// (docker-compose's own dependency; the Kubernetes validator's venv has it
/// too). Empty documents are left out.
pub fn yaml_documents(python: &Path, text: &str) -> Vec<Value> {
    let output = run_in(
        python.to_str().unwrap(),
        &[
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ],
        Duration::from_secs(30),
        Some(text.as_bytes()),
    );
    assert!(output.success, "YAML did not parse:\n{}", output.text);
    match serde_json::from_str(&output.stdout).unwrap() {
        Value::Array(documents) => documents,
        other => panic!("not a list of documents: {other}"),
    }
}

/// The string items of a JSON array (none when it is not one).
pub fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Makes sure `tools` are installed (as `scripts/setup` does: apt-get, as
/// root); `Err` says why they are not.
pub fn install(tools: &[&str], packages: &[&str]) -> Result<(), String> {
    let missing = || {
        tools
            .iter()
            .filter(|t| !on_path(t))
            .copied()
            .collect::<Vec<_>>()
    };
    if missing().is_empty() {
        return Ok(());
    }
    let root = run("id", &["-u"], Duration::from_secs(10)).stdout.trim() == "0";
    if !root {
        return Err(format!(
            "{:?} not installed and not root to apt-get install them (run scripts/setup)",
            missing()
        ));
    }
    eprintln!("installing {packages:?} with apt-get");
    let update = run("apt-get", &["update", "-qq"], Duration::from_secs(300));
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(packages);
    let install = run("apt-get", &args, Duration::from_secs(900));
    if missing().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{:?} could not be installed:\n{}{}",
            missing(),
            update.text,
            install.text
        ))
    }
}
