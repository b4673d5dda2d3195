//! The compose stack, checked for real on this machine (docs/deploy.md).
//!
//! `the_compose_stack_is_valid_and_agrees_with_the_repo`: `docker-compose
//! config` parses docker-compose.yml; every mounted file exists; the tailer
//! uses only contract variables; Prometheus scrapes the tailer's metrics
//! port and its config passes `promtool check config` on the files as the
//! container sees them; Grafana's provisioning loads the dashboard, whose
//! data source resolves to the provisioned one.

use crate::common::dockerfile;
use crate::common::tools::{install, must, run, strings, yaml_documents};
use outbox_testkit::repo_root;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
