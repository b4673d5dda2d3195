//! The container image and the compose stack, checked for real on this
//! machine (docs/contract.md section 5, docs/deploy.md).
//!
//! - `the_runtime_image_builds_and_is_configured_as_the_contract_says`: builds
//!   the repo's `Dockerfile`, stage `runtime`, with podman. No registry is
//!   reachable, so the base is Debian 12 made locally (mmdebstrap, `podman
//!   import`, cached in podman's storage as `localhost/outbox-tailer-base:bookworm`)
//!   and stands in for `debian:bookworm-slim` (`RUNTIME_BASE`); the binary this
//!   test run built stands in for the `builder` stage (`--build-context
//!   builder=<dir with out/outbox-tailer>`; Debian's Rust is too old for the
//!   real one). The build runs the image's own smoke steps (`outbox-tailer
//!   --version`, `outbox-tailer healthcheck --help`, as the image's user); then
//!   `podman inspect` and the image's files are checked. Skipped, with the
//!   reason printed, only when podman or mmdebstrap cannot be installed.
//! - `the_compose_stack_is_valid_and_agrees_with_the_repo`: `docker-compose
//!   config` parses docker-compose.yml; every mounted file exists; the tailer
//!   uses only contract variables; Prometheus scrapes the tailer's metrics
//!   port and its config passes `promtool check config` on the files as the
//!   container sees them; Grafana's provisioning loads the dashboard, whose
//!   data source resolves to the provisioned one.

use crate::common::dockerfile;
use crate::common::tools::{must, on_path, run, strings, yaml_documents, Output};
use outbox_testkit::repo_root;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The local stand-in for debian:bookworm-slim (kept: making it takes ~30 s).
const BASE_IMAGE: &str = "localhost/outbox-tailer-base:bookworm";
/// The Dockerfile's `runtime-base` stage, tagged so that its apt layer stays
/// cached between runs.
const RUNTIME_BASE_IMAGE: &str = "localhost/outbox-tailer-runtime-base:container-test";
/// The image under test, removed afterwards (with the layers only it uses).
const IMAGE: &str = "localhost/outbox-tailer:container-test";

/// Makes sure `tools` are installed (as `scripts/setup` does: apt-get, as
/// root); `Err` says why they are not.
fn install(tools: &[&str], packages: &[&str]) -> Result<(), String> {
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
    eprintln!("container: installing {packages:?} with apt-get");
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
            "SKIPPED container::the_runtime_image_builds_and_is_configured_as_the_contract_says: {reason}"
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

/// YAML to JSON with PyYAML (a dependency of docker-compose 1.x itself).
fn yaml(text: &str) -> Value {
    let mut documents = yaml_documents(Path::new("python3"), text);
    assert_eq!(documents.len(), 1, "one YAML document");
    documents.remove(0)
}

/// The environment variable names of docs/contract.md section 2: the flag
/// table's env column, and the `*_FILE` secret variables.
fn contract_variables() -> BTreeSet<String> {
    let contract = std::fs::read_to_string(repo_root().join("docs/contract.md")).unwrap();
    let section = contract
        .split("\n## ")
        .find(|s| s.starts_with("2."))
        .expect("docs/contract.md has a section 2");
    let names = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .map(str::to_owned)
            .collect()
    };
    let mut variables = BTreeSet::new();
    for line in section.lines().filter(|l| l.starts_with("| `--")) {
        let env_cell = line.split('|').nth(2).unwrap();
        variables.extend(names(env_cell));
    }
    variables.extend(names(section).into_iter().filter(|n| n.ends_with("_FILE")));
    variables
}

/// `host:port` of a URL or address (`scheme://user:pass@host:port/path`).
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = authority.rsplit_once(':').unwrap();
    (host.to_owned(), port.parse().unwrap())
}

/// A service's bind mounts as (container path, host path).
fn bind_mounts(service: &Value) -> Vec<(String, PathBuf)> {
    let mut mounts = Vec::new();
    for volume in service["volumes"].as_array().into_iter().flatten() {
        let (source, target) = match volume {
            Value::String(short) => {
                let mut parts = short.split(':');
                (
                    parts.next().unwrap().to_owned(),
                    parts.next().unwrap_or_default().to_owned(),
                )
            }
            long => (
                long["source"].as_str().unwrap_or_default().to_owned(),
                long["target"].as_str().unwrap().to_owned(),
            ),
        };
        // Named volumes have a bare name as their source; binds a path.
        if source.starts_with('/') || source.starts_with('.') {
            mounts.push((target, repo_root().join(source)));
        }
    }
    mounts
}

/// A temp dir holding a service's bind mounts where the container sees them.
fn container_files(service: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (target, source) in bind_mounts(service) {
        let inside = dir.path().join(target.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        if source.is_dir() {
            std::fs::create_dir_all(&inside).unwrap();
            for entry in std::fs::read_dir(&source).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), inside.join(entry.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&source, &inside).unwrap();
        }
    }
    dir
}

#[test]
fn the_compose_stack_is_valid_and_agrees_with_the_repo() {
    install(&["docker-compose"], &["docker-compose"]).unwrap();
    let root = repo_root();
    let config = must(
        "docker-compose",
        &["-f", "docker-compose.yml", "config"],
        Duration::from_secs(60),
    );
    let compose = yaml(&config.stdout);
    let services = &compose["services"];
    let service = |name: &str| {
        let s = &services[name];
        assert!(s.is_object(), "service {name} in docker-compose.yml");
        s
    };
    let env = |name: &str| -> BTreeMap<String, String> {
        service(name)["environment"]
            .as_object()
            .map(|e| {
                e.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_owned)))
                    .collect()
            })
            .unwrap_or_default()
    };

    // Every build target is a stage of the Dockerfile, whose last stage is
    // the tailer (so a plain `docker build .` gives it).
    let stages: Vec<String> = dockerfile::stages().into_iter().map(|s| s.name).collect();
    assert_eq!(
        stages.last().map(String::as_str),
        Some("runtime"),
        "{stages:?}"
    );
    for (name, target) in [
        ("migrate", "migrate"),
        ("tailer", "runtime"),
        ("chat", "chat"),
    ] {
        let build = &service(name)["build"];
        assert_eq!(Path::new(build["context"].as_str().unwrap()), root);
        assert_eq!(build["target"], target, "{name}'s build target");
        assert!(
            stages.iter().any(|s| s == target),
            "stage {target} in {stages:?}"
        );
    }

    // Every bind-mounted file or directory exists in the repo.
    for (name, s) in services.as_object().unwrap() {
        for (target, source) in bind_mounts(s) {
            assert!(
                source.exists() && source.starts_with(root),
                "{name} mounts {} at {target}: not in the repo",
                source.display()
            );
        }
    }

    // PostgreSQL with logical WAL and a health check; the migration waits for
    // it, the tailer for the migration to have succeeded.
    let postgres = service("postgres");
    assert!(postgres["image"]
        .as_str()
        .unwrap()
        .starts_with("postgres:15"));
    assert!(strings(&postgres["command"]).contains(&"wal_level=logical"));
    assert!(postgres["healthcheck"]["test"].is_array());
    assert_eq!(
        service("migrate")["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    let tailer = service("tailer");
    assert_eq!(
        tailer["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
    assert_eq!(
        tailer["healthcheck"]["test"],
        serde_json::json!(["CMD", "outbox-tailer", "healthcheck"])
    );

    // NATS with JetStream storing on a volume.
    let nats = strings(&service("nats")["command"]);
    assert!(nats.contains(&"-js"), "{nats:?}");
    let store = nats[nats.iter().position(|a| *a == "-sd").unwrap() + 1];
    assert!(
        strings(&service("nats")["volumes"])
            .iter()
            .any(|v| v.split(':').nth(1) == Some(store)),
        "JetStream's store {store} is a volume"
    );

    // The tailer's environment: contract variables only, pointing at the
    // stack's own servers, the database the migration migrated.
    let contract = contract_variables();
    assert!(
        contract.len() > 20
            && contract.contains("DATABASE_URL")
            && contract.contains("DATABASE_URL_FILE"),
        "parsed the contract's variables: {contract:?}"
    );
    let tailer_env = env("tailer");
    for name in tailer_env.keys() {
        assert!(
            contract.contains(name),
            "the tailer's {name} is not a contract variable (docs/contract.md section 2)"
        );
    }
    let database_url = &tailer_env["DATABASE_URL"];
    assert_eq!(host_port(database_url).0, "postgres");
    assert_eq!(&env("migrate")["DATABASE_URL"], database_url);
    assert_eq!(&env("chat")["DATABASE_URL"], database_url);
    assert_eq!(
        host_port(&tailer_env["NATS_URL"]),
        ("nats".to_owned(), 4222)
    );
    assert!(env("chat")["CHAT_DEMO_RATE"].parse::<f64>().unwrap() > 0.0);
    let metrics_port = host_port(&tailer_env["METRICS_ADDR"]).1;

    // Prometheus: the config and rules as the container sees them pass
    // promtool; the job the alerts name scrapes the tailer's metrics port.
    let prometheus = service("prometheus");
    let config_file = strings(&prometheus["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file in prometheus' command")
        .to_owned();
    let files = container_files(prometheus);
    let config_path = files.path().join(config_file.trim_start_matches('/'));
    let check = run(
        "promtool",
        &["check", "config", config_path.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(check.success, "promtool check config:\n{}", check.text);
    assert!(
        check.text.contains("1 rules found") || check.text.contains("rules found"),
        "{}",
        check.text
    );
    let prom_config = yaml(&std::fs::read_to_string(&config_path).unwrap());
    for rules in strings(&prom_config["rule_files"]) {
        let inside = Path::new(&config_file).parent().unwrap().join(rules);
        let source = bind_mounts(prometheus)
            .into_iter()
            .find(|(target, _)| Path::new(target) == inside)
            .map(|(_, source)| source);
        assert_eq!(
            source,
            Some(root.join("dashboards/alerts.yml")),
            "rule file {rules}"
        );
    }
    let job = prom_config["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "outbox-tailer")
        .expect("a scrape job named outbox-tailer (dashboards/alerts.yml assumes it)");
    let targets: Vec<&str> = job["static_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| strings(&c["targets"]))
        .collect();
    assert_eq!(
        targets.iter().map(|t| host_port(t)).collect::<Vec<_>>(),
        [("tailer".to_owned(), metrics_port)],
        "Prometheus scrapes the tailer's METRICS_ADDR port"
    );

    // Grafana: a provisioned Prometheus data source with a fixed uid, at
    // Prometheus' address, and a file provider that loads the dashboard.
    let grafana = service("grafana");
    let files = container_files(grafana);
    let provisioning = files.path().join("etc/grafana/provisioning");
    let read_yaml_dir = |dir: &str| -> Vec<Value> {
        let mut docs = Vec::new();
        for entry in std::fs::read_dir(provisioning.join(dir)).unwrap() {
            docs.push(yaml(
                &std::fs::read_to_string(entry.unwrap().path()).unwrap(),
            ));
        }
        docs
    };
    let datasources: Vec<Value> = read_yaml_dir("datasources")
        .iter()
        .flat_map(|d| d["datasources"].as_array().cloned().unwrap_or_default())
        .collect();
    let [datasource] = datasources.as_slice() else {
        panic!("one provisioned data source: {datasources:?}");
    };
    assert_eq!(datasource["type"], "prometheus");
    assert_eq!(datasource["isDefault"], true);
    let uid = datasource["uid"].as_str().expect("a fixed uid");
    let prometheus_port = strings(&prometheus["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--web.listen-address="))
        .map_or(9090, |a| host_port(a).1);
    assert_eq!(
        host_port(datasource["url"].as_str().unwrap()),
        ("prometheus".to_owned(), prometheus_port)
    );
    let mut dashboards = Vec::new();
    for provider in read_yaml_dir("dashboards")
        .iter()
        .flat_map(|d| d["providers"].as_array().cloned().unwrap_or_default())
    {
        assert_eq!(provider["type"], "file");
        let path = provider["options"]["path"].as_str().unwrap();
        for (target, source) in bind_mounts(grafana) {
            if Path::new(&target).starts_with(path) {
                dashboards.push(source);
            }
        }
    }
    assert_eq!(dashboards, [root.join("dashboards/outbox-tailer.json")]);

    // The dashboard's data source: its `datasource` variable picks the
    // default Prometheus (the provisioned one), and every panel and query
    // uses that variable or the provisioned uid.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("dashboards/outbox-tailer.json")).unwrap(),
    )
    .unwrap();
    let variable = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(variable["query"], datasource["type"]);
    let name = variable["name"].as_str().unwrap();
    let allowed = [format!("${{{name}}}"), format!("${name}"), uid.to_owned()];
    let mut references = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        for reference in
            std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
        {
            if reference.is_null() {
                continue;
            }
            references += 1;
            assert_eq!(reference["type"], "prometheus", "{}", panel["title"]);
            let used = reference["uid"].as_str().unwrap_or_default();
            assert!(
                allowed.iter().any(|a| a == used),
                "panel {} uses data source {used:?}, not {allowed:?}",
                panel["title"]
            );
        }
    }
    assert!(references > 0);
}
