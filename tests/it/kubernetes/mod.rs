//! deploy/kubernetes/, checked without a cluster (none can run on these
//! machines) by the tools a cluster's admission would use, and against the
//! repo it deploys:
//!
//! - every directory renders with `kubectl kustomize`, and every object
//!   passes the OpenAPI schemas of current Kubernetes releases
//!   (`kubernetes-validate --strict`, pinned in tests/requirements-kubernetes.txt);
//!   the Prometheus Operator's kinds, which it has no schema for, are checked
//!   here for the fields they need;
//! - every pod template meets Pod Security "restricted", and has a read-only
//!   root filesystem ([`pod_security`], tested on a pod that breaks each rule);
//! - the tailer and the migration agree with the `Dockerfile` (image names,
//!   user, port, `METRICS_ADDR`), with the binary (every env name and flag it
//!   is given is one it reads), with alembic/env.py and with docs/contract.md
//!   (probe paths, the 256 MB bound, the shutdown deadline);
//! - the PodDisruptionBudget, the NetworkPolicies, the PodMonitor and the
//!   anti-affinity select the pods they are for;
//! - the PrometheusRule and the dashboard ConfigMap hold dashboards/ as it is
//!   (`scripts/gen-kubernetes` writes them);
//! - the overlays change only what they say.

mod pod_security;

use crate::common::dockerfile;
use crate::common::tools::{must, on_path, run, strings, yaml_documents};
use outbox_testkit::repo_root;
use pod_security::restricted_violations;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// The kustomizations under deploy/kubernetes/.
const DIRECTORIES: [&str; 4] = [
    "base",
    "migrate",
    "overlays/jetstream-cluster",
    "overlays/argocd",
];
/// The oldest and the newest Kubernetes release maintained upstream when
/// this was written (both bundled with the pinned kubernetes-validate).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.35.0", "1.37.0"];
/// Kinds kubernetes-validate has no schema for: checked by [`custom_resource_problems`].
const CUSTOM_KINDS: [(&str, &str); 2] = [
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
];
/// After SIGTERM the tailer exits within this (docs/deploy.md; the marking
/// stage's drain in src/pipeline/marking.rs).
const SHUTDOWN_DEADLINE_SECONDS: u64 = 10;
/// The resident-memory bound of docs/contract.md section 4 (256 MB).
const MEMORY_LIMIT: &str = "256Mi";

fn kubectl() -> &'static str {
    assert!(
        on_path("kubectl"),
        "kubectl is required for tests/it/kubernetes/ (`kubectl kustomize` with kustomize v5: kubectl 1.27 or later; Debian's kubernetes-client 1.20 is too old)"
    );
    "kubectl"
}

/// A tool of the validator's venv (scripts/setup makes it).
fn venv_tool(tool: &str) -> PathBuf {
    let path = repo_root().join(".venv-kubernetes/bin").join(tool);
    assert!(
        path.exists(),
        "{} missing: run scripts/setup (it installs tests/requirements-kubernetes.txt into .venv-kubernetes)",
        path.display()
    );
    path
}

/// `kubectl kustomize deploy/kubernetes/<directory>`: the YAML stream.
fn rendered(directory: &str) -> String {
    let path = format!("deploy/kubernetes/{directory}");
    must(kubectl(), &["kustomize", &path], Duration::from_secs(60)).stdout
}

fn objects(yaml: &str) -> Vec<Value> {
    yaml_documents(&venv_tool("python"), yaml)
}

fn render(directory: &str) -> Vec<Value> {
    objects(&rendered(directory))
}

fn secret_examples() -> Vec<Value> {
    objects(
        &std::fs::read_to_string(repo_root().join("deploy/kubernetes/secret.example.yaml"))
            .unwrap(),
    )
}

/// The one object of `kind` named `name`.
fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name}");
    found[0]
}

/// Every pod template (workload kinds) as ("Kind/name", template).
fn pod_templates(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter_map(|o| {
            let template = match o["kind"].as_str()? {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                    &o["spec"]["template"]
                }
                "CronJob" => &o["spec"]["jobTemplate"]["spec"]["template"],
                _ => return None,
            };
            Some((
                format!(
                    "{}/{}",
                    o["kind"].as_str()?,
                    o["metadata"]["name"].as_str()?
                ),
                template,
            ))
        })
        .collect()
}

/// A label selector (`matchLabels` only) against a set of labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "only matchLabels selectors are checked: {selector}"
    );
    let wanted = selector["matchLabels"].as_object().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v)
}

/// The items of `spec.<list>`, a list the kind needs at least one of.
fn required<'a>(spec: &'a Value, list: &str, problems: &mut Vec<String>) -> &'a [Value] {
    let items = spec[list].as_array().map_or(&[][..], Vec::as_slice);
    if items.is_empty() {
        problems.push(format!("no spec.{list}"));
    }
    items
}

/// What is wrong with a Prometheus Operator object, for the fields this
/// deployment uses (kubernetes-validate has no schema for them).
fn custom_resource_problems(object: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let spec = &object["spec"];
    let known: &[&str] = match object["kind"].as_str() {
        Some("PodMonitor") => {
            for endpoint in required(spec, "podMetricsEndpoints", &mut problems) {
                if !endpoint["port"].is_string() {
                    problems.push(format!("endpoint without a port name: {endpoint}"));
                }
            }
            if spec["selector"]["matchLabels"]
                .as_object()
                .is_none_or(|m| m.is_empty())
            {
                problems.push("spec.selector.matchLabels is empty".to_owned());
            }
            &[
                "jobLabel",
                "selector",
                "podMetricsEndpoints",
                "namespaceSelector",
            ]
        }
        Some("PrometheusRule") => {
            for group in required(spec, "groups", &mut problems) {
                if !group["name"].is_string() {
                    problems.push(format!("a group without a name: {group}"));
                }
                for rule in group["rules"].as_array().into_iter().flatten() {
                    let named = rule["alert"].is_string() || rule["record"].is_string();
                    if !named || !rule["expr"].is_string() {
                        problems.push(format!("a rule without alert/record or expr: {rule}"));
                    }
                }
            }
            &["groups"]
        }
        _ => return vec![format!("not a known custom kind: {}", object["kind"])],
    };
    for key in spec.as_object().into_iter().flat_map(|s| s.keys()) {
        if !known.contains(&key.as_str()) {
            problems.push(format!("unexpected spec.{key}"));
        }
    }
    problems
}

#[test]
fn every_object_renders_and_passes_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![repo_root()
        .join("deploy/kubernetes/secret.example.yaml")
        .to_str()
        .unwrap()
        .to_owned()];
    let mut custom = 0;
    for directory in DIRECTORIES {
        let yaml = rendered(directory);
        let file = dir
            .path()
            .join(format!("{}.yaml", directory.replace('/', "-")));
        std::fs::write(&file, &yaml).unwrap();
        files.push(file.to_str().unwrap().to_owned());
        for object in objects(&yaml) {
            let kind = (
                object["apiVersion"].as_str().unwrap_or_default(),
                object["kind"].as_str().unwrap_or_default(),
            );
            if CUSTOM_KINDS.contains(&kind) {
                custom += 1;
                let problems = custom_resource_problems(&object);
                assert!(problems.is_empty(), "{directory}: {kind:?}: {problems:?}");
            }
        }
    }
    assert!(
        custom >= 2,
        "the PodMonitor and the PrometheusRule were checked"
    );

    let validate = venv_tool("kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let mut args = vec!["--strict", "--kubernetes-version", version];
        args.extend(files.iter().map(String::as_str));
        let output = run(validate.to_str().unwrap(), &args, Duration::from_secs(120));
        // Every line but the skipped custom kinds is a failure (an unknown
        // apiVersion is only a warning to the validator).
        let unexpected: Vec<&str> = output
            .text
            .lines()
            .filter(|line| line.starts_with("WARN") || line.starts_with("ERROR"))
            .filter(|line| {
                !CUSTOM_KINDS.iter().any(|(api, kind)| {
                    line.starts_with("WARN")
                        && line.contains(&format!(
                            "Couldn't find schema for kind {kind} with api version {api} "
                        ))
                })
            })
            .collect();
        assert!(
            output.success && unexpected.is_empty(),
            "kubernetes-validate --strict against {version}:\n{}",
            output.text
        );
    }
}

#[test]
fn every_pod_meets_pod_security_restricted() {
    let mut checked = Vec::new();
    for directory in DIRECTORIES {
        let objects = render(directory);
        for (name, template) in pod_templates(&objects) {
            let violations = restricted_violations(&template["spec"]);
            assert!(
                violations.is_empty(),
                "{directory}: {name} breaks Pod Security \"restricted\": {violations:?}"
            );
            checked.push(name);
        }
    }
    for name in ["Deployment/outbox-tailer", "Job/outbox-tailer-migrate"] {
        assert!(checked.iter().any(|c| c == name), "{name} in {checked:?}");
    }
}

/// `outbox-tailer <args>`: its help text.
fn tailer_help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    must(
        env!("CARGO_BIN_EXE_outbox-tailer"),
        &all,
        Duration::from_secs(30),
    )
    .stdout
}

/// The environment variables the tailer reads: each flag's `[env: NAME]`,
/// and the `*_FILE` secret variables its help names.
fn tailer_variables() -> BTreeSet<String> {
    let help = tailer_help(&["run"]);
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap_or_default().to_owned())
        .collect();
    names.extend(
        help.split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .filter(|w| w.len() > 5 && w.ends_with("_FILE"))
            .map(str::to_owned),
    );
    names
}

/// The variables alembic/env.py reads (`os.environ.get("NAME"` / `os.environ["NAME"]`).
fn alembic_variables() -> BTreeSet<String> {
    let env_py = std::fs::read_to_string(repo_root().join("alembic/env.py")).unwrap();
    ["os.environ.get(\"", "os.environ[\""]
        .iter()
        .flat_map(|call| env_py.split(*call).skip(1))
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect()
}

/// The image a kustomization maps `name` to (`images:`), as `newName:newTag`.
fn kustomized_image(directory: &str, name: &str) -> String {
    let path = repo_root().join(format!("deploy/kubernetes/{directory}/kustomization.yaml"));
    let kustomization = objects(&std::fs::read_to_string(path).unwrap()).remove(0);
    let entry = kustomization["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{directory}/kustomization.yaml maps image {name}"));
    assert_eq!(
        entry["newTag"],
        env!("CARGO_PKG_VERSION"),
        "{directory}: the image tag is this release's version"
    );
    let new_name = entry["newName"].as_str().unwrap();
    assert_eq!(
        new_name.rsplit('/').next(),
        Some(name),
        "{directory}: {name} is pushed as {new_name}: another image"
    );
    format!("{new_name}:{}", entry["newTag"].as_str().unwrap())
}

/// `uid:gid` of a Dockerfile stage's USER.
fn stage_user(stage: &str) -> (i64, i64) {
    let user = dockerfile::stage(stage)
        .last("USER")
        .unwrap_or_else(|| panic!("USER in stage {stage}"))
        .to_owned();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, &user));
    (uid.parse().unwrap(), gid.parse().unwrap())
}

/// The pod and its one container: runs as the image's user, and the image
/// is the one the Dockerfile builds for `target`, as the kustomization maps it.
fn check_image_and_user(directory: &str, pod: &Value, container: &Value, target: &str) {
    let built = dockerfile::built_images();
    let name = built
        .get(target)
        .unwrap_or_else(|| panic!("the Dockerfile's header builds {target}: {built:?}"));
    assert_eq!(
        container["image"].as_str().unwrap(),
        kustomized_image(directory, name),
        "{directory}: the image the Dockerfile builds as {name}, mapped by images:"
    );
    assert!(container["command"].is_null(), "the image's own entrypoint");
    let (uid, gid) = stage_user(target);
    assert_eq!(pod["securityContext"]["runAsUser"], uid, "the image's user");
    assert_eq!(
        pod["securityContext"]["runAsGroup"], gid,
        "the image's group"
    );
}

/// The Secret example (secret.example.yaml) with `name` has `key`.
fn example_secret_has(name: &str, key: &str) {
    let examples = secret_examples();
    let secret = find(&examples, "Secret", name);
    assert!(
        secret["stringData"][key].is_string(),
        "secret.example.yaml: Secret {name} has no key {key}"
    );
}

#[test]
fn the_tailer_agrees_with_the_image_the_binary_and_the_contract() {
    let objects = render("base");
    let deployment = find(&objects, "Deployment", "outbox-tailer");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let [container] = pod["containers"].as_array().unwrap().as_slice() else {
        panic!("one container: {}", pod["containers"]);
    };
    check_image_and_user("base", pod, container, "runtime");

    // Two replicas: the new pod of a rollout is a Ready standby before an
    // old one stops, so there is always one to take over.
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > SHUTDOWN_DEADLINE_SECONDS,
        "terminationGracePeriodSeconds {grace} must exceed the {SHUTDOWN_DEADLINE_SECONDS} s shutdown deadline"
    );
    assert_eq!(container["resources"]["limits"]["memory"], MEMORY_LIMIT);

    // The port: the image's EXPOSE and METRICS_ADDR, and the manifest's.
    let runtime = dockerfile::stage("runtime");
    let exposed: u64 = runtime.last("EXPOSE").unwrap().parse().unwrap();
    let metrics_addr = runtime.env("METRICS_ADDR").expect("ENV METRICS_ADDR");
    let image_port: u64 = metrics_addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(exposed, image_port, "EXPOSE and METRICS_ADDR");
    let [port] = container["ports"].as_array().unwrap().as_slice() else {
        panic!("one port: {}", container["ports"]);
    };
    assert_eq!(port["containerPort"], exposed, "the image's port");
    assert_eq!(port["name"], "metrics");

    // Probes on the endpoints of docs/contract.md section 4, on that port.
    let contract = std::fs::read_to_string(repo_root().join("docs/contract.md")).unwrap();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert!(
            contract.contains(&format!("`GET {path}`")),
            "{path} in the contract"
        );
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port["name"] || get["port"] == port["containerPort"],
            "{probe} on the metrics port: {get}"
        );
    }

    // The environment: names the binary reads, secrets as files.
    let known = tailer_variables();
    assert!(
        known.contains("DATABASE_URL_FILE") && known.contains("NATS_CREDS"),
        "read the binary's variables: {known:?}"
    );
    let env = container["env"].as_array().unwrap();
    for variable in env {
        let name = variable["name"].as_str().unwrap();
        assert!(
            known.contains(name),
            "{name} is not a variable outbox-tailer reads ({known:?})"
        );
        assert!(
            !matches!(name, "DATABASE_URL" | "NATS_PASSWORD" | "NATS_TOKEN"),
            "{name}: secrets come from files (the *_FILE variables)"
        );
        if name == "METRICS_ADDR" {
            let value = variable["value"].as_str().unwrap();
            assert!(value.ends_with(&format!(":{exposed}")), "{name}={value}");
        }
    }
    let mounts = container["volumeMounts"].as_array().unwrap();
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    for file_variable in ["DATABASE_URL_FILE", "NATS_CREDS"] {
        let path = env
            .iter()
            .find(|v| v["name"] == file_variable)
            .and_then(|v| v["value"].as_str())
            .unwrap_or_else(|| panic!("{file_variable} is set"));
        let (dir, key) = path.rsplit_once('/').unwrap();
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{file_variable}={path}: nothing mounted at {dir}"));
        let secret = &volume(mount["name"].as_str().unwrap())["secret"];
        assert!(secret.is_object(), "{dir} is a Secret volume");
        // Files are root's: without a bit for others, the group must be the tailer's.
        let mode = secret["defaultMode"].as_u64().unwrap_or(0o644);
        if mode & 0o004 == 0 {
            assert_eq!(
                pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"],
                "{file_variable}: mode {mode:o} is readable through fsGroup only"
            );
            assert_ne!(mode & 0o040, 0, "{file_variable}: mode {mode:o}");
        }
        example_secret_has(secret["secretName"].as_str().unwrap(), key);
    }
    // The replication bridge's socket directory: a writable /tmp.
    let tmp = mounts
        .iter()
        .find(|m| m["mountPath"] == "/tmp")
        .expect("a volume at /tmp");
    assert!(volume(tmp["name"].as_str().unwrap())["emptyDir"].is_object());

    // Arguments: a subcommand of the binary, then flags it has.
    let top = tailer_help(&[]);
    let commands: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .expect("Commands: in --help")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let args = strings(&container["args"]);
    let (subcommand, flags) = args.split_first().expect("args: the subcommand");
    assert!(
        commands.contains(subcommand),
        "{subcommand} in {commands:?}"
    );
    let help = tailer_help(&[subcommand]);
    for flag in flags.iter().filter(|a| a.starts_with('-')) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{subcommand} has no flag {flag}"
        );
    }

    // No API access: no token in the pods.
    assert_eq!(pod["automountServiceAccountToken"], false);
    let account = find(
        &objects,
        "ServiceAccount",
        pod["serviceAccountName"].as_str().unwrap(),
    );
    assert_eq!(account["automountServiceAccountToken"], false);
}

#[test]
fn the_migration_job_agrees_with_its_image_and_runs_once_per_release() {
    let objects = render("migrate");
    let job = find(&objects, "Job", "outbox-tailer-migrate");
    let pod = &job["spec"]["template"]["spec"];
    let [container] = pod["containers"].as_array().unwrap().as_slice() else {
        panic!("one container: {}", pod["containers"]);
    };
    check_image_and_user("migrate", pod, container, "migrate");
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // A Job that vanishes after it ran would be re-created, and run again,
    // by every GitOps reconciliation.
    assert!(job["spec"]["ttlSecondsAfterFinished"].is_null());
    // Argo CD runs it before the sync, replacing the last run.
    let annotations = &job["metadata"]["annotations"];
    assert_eq!(annotations["argocd.argoproj.io/hook"], "PreSync");
    assert_eq!(
        annotations["argocd.argoproj.io/hook-delete-policy"],
        "BeforeHookCreation"
    );

    let known = alembic_variables();
    assert!(known.contains("DATABASE_URL"), "{known:?}");
    for variable in container["env"].as_array().unwrap() {
        let name = variable["name"].as_str().unwrap();
        assert!(known.contains(name), "alembic/env.py reads no {name}");
        let reference = &variable["valueFrom"]["secretKeyRef"];
        assert!(reference.is_object(), "{name} comes from a Secret");
        example_secret_has(
            reference["name"].as_str().unwrap(),
            reference["key"].as_str().unwrap(),
        );
    }
}

/// The job name the alert rules select (`job="…"`), one for all of them.
fn alerts_job() -> String {
    let alerts = std::fs::read_to_string(repo_root().join("dashboards/alerts.yml")).unwrap();
    let jobs: BTreeSet<String> = alerts
        .split("job=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect();
    assert_eq!(jobs.len(), 1, "one job name in alerts.yml: {jobs:?}");
    jobs.into_iter().next().unwrap()
}

#[test]
fn the_policies_and_the_monitor_select_the_tailer_pods() {
    let tailer_objects = render("base");
    let migrate_objects = render("migrate");
    let deployment = find(&tailer_objects, "Deployment", "outbox-tailer");
    let tailer_pod = &deployment["spec"]["template"];
    let tailer_labels = &tailer_pod["metadata"]["labels"];
    let job = find(&migrate_objects, "Job", "outbox-tailer-migrate");
    let migrate_labels = &job["spec"]["template"]["metadata"]["labels"];
    let only_tailers = |what: &str, selector: &Value| {
        assert!(
            selects(selector, tailer_labels),
            "{what} selects the tailer's pods"
        );
        assert!(
            !selects(selector, migrate_labels),
            "{what} selects the migration's pod too"
        );
    };
    only_tailers("the Deployment", &deployment["spec"]["selector"]);
    let anti = &tailer_pod["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    only_tailers("the pod anti-affinity", &anti["labelSelector"]);

    // A drain evicts one of the two, never both.
    let budget = find(&tailer_objects, "PodDisruptionBudget", "outbox-tailer");
    only_tailers("the PodDisruptionBudget", &budget["spec"]["selector"]);
    let min_available = budget["spec"]["minAvailable"].as_i64().unwrap();
    assert!(min_available >= 1 && min_available < deployment["spec"]["replicas"].as_i64().unwrap());

    // Traffic: the metrics port in; PostgreSQL, NATS and DNS out.
    let port = &tailer_pod["spec"]["containers"][0]["ports"][0];
    let ports = |rules: &Value| -> BTreeSet<String> {
        rules
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
            .collect()
    };
    let policy = find(&tailer_objects, "NetworkPolicy", "outbox-tailer");
    only_tailers("the tailer's NetworkPolicy", &policy["spec"]["podSelector"]);
    assert_eq!(
        strings(&policy["spec"]["policyTypes"]),
        ["Ingress", "Egress"]
    );
    let metrics_in: BTreeSet<String> = [&port["containerPort"], &port["name"]]
        .iter()
        .map(|p| format!("{p}/TCP"))
        .collect();
    let ingress = ports(&policy["spec"]["ingress"]);
    assert!(
        !ingress.is_empty() && ingress.is_subset(&metrics_in),
        "ingress {ingress:?}: the metrics port only"
    );
    let egress = ports(&policy["spec"]["egress"]);
    for wanted in ["5432/TCP", "4222/TCP", "53/UDP", "53/TCP"] {
        assert!(
            egress.contains(wanted),
            "tailer egress {egress:?} lacks {wanted}"
        );
    }
    let policy = find(&migrate_objects, "NetworkPolicy", "outbox-tailer-migrate");
    assert!(selects(&policy["spec"]["podSelector"], migrate_labels));
    assert!(!selects(&policy["spec"]["podSelector"], tailer_labels));
    let egress = ports(&policy["spec"]["egress"]);
    for wanted in ["5432/TCP", "53/UDP", "53/TCP"] {
        assert!(
            egress.contains(wanted),
            "migration egress {egress:?} lacks {wanted}"
        );
    }
    assert!(
        ports(&policy["spec"]["ingress"]).is_empty(),
        "nothing talks to the migration"
    );

    // Prometheus scrapes both tailers on the metrics port, as the job the
    // alerts and the dashboard name.
    let monitor = find(&tailer_objects, "PodMonitor", "outbox-tailer");
    only_tailers("the PodMonitor", &monitor["spec"]["selector"]);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        endpoint["port"], port["name"],
        "scrapes the named metrics port"
    );
    assert_eq!(endpoint["path"], "/metrics");
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(
        tailer_labels[job_label],
        alerts_job(),
        "the job label (pod label {job_label}) is the job alerts.yml selects"
    );
}

#[test]
fn the_prometheus_rule_and_the_dashboard_are_dashboards_as_shipped() {
    let objects = render("base");
    let stale = "deploy/kubernetes/base/ differs from dashboards/: run scripts/gen-kubernetes";
    let alerts = objects_of_file("dashboards/alerts.yml");
    let rule = find(&objects, "PrometheusRule", "outbox-tailer");
    assert_eq!(rule["spec"], json!({"groups": alerts["groups"]}), "{stale}");

    let dashboard =
        std::fs::read_to_string(repo_root().join("dashboards/outbox-tailer.json")).unwrap();
    let config_map = find(&objects, "ConfigMap", "outbox-tailer-dashboard");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let data = config_map["data"].as_object().unwrap();
    assert_eq!(data.len(), 1, "one dashboard");
    assert_eq!(
        data["outbox-tailer.json"].as_str(),
        Some(dashboard.as_str()),
        "{stale}"
    );
}

/// A YAML file of the repo, one document.
fn objects_of_file(path: &str) -> Value {
    objects(&std::fs::read_to_string(repo_root().join(path)).unwrap()).remove(0)
}

#[test]
fn the_overlays_change_only_what_they_say() {
    let base = render("base");
    let migrate = render("migrate");

    // Argo CD's: the tailer and the migration, nothing added or changed.
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    let mut both: Vec<Value> = base.iter().chain(&migrate).cloned().collect();
    let mut argocd = render("overlays/argocd");
    both.sort_by_key(key);
    argocd.sort_by_key(key);
    assert!(both == argocd, "overlays/argocd is base + migrate");

    // The JetStream cluster's: the tailer's NATS settings, nothing else.
    let mut cluster = render("overlays/jetstream-cluster");
    let env = |objects: &mut Vec<Value>| -> Vec<Value> {
        let deployment = objects
            .iter_mut()
            .find(|o| o["kind"] == "Deployment")
            .unwrap();
        let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap();
        let nats: Vec<Value> = env
            .iter()
            .filter(|v| v["name"] == "NATS_URL" || v["name"] == "OUTBOX_STREAM_REPLICAS")
            .cloned()
            .collect();
        env.retain(|v| !nats.contains(v));
        nats
    };
    let mut base = base;
    env(&mut base);
    let settings = env(&mut cluster);
    assert!(
        base == cluster,
        "overlays/jetstream-cluster changes only NATS_URL and OUTBOX_STREAM_REPLICAS"
    );
    let value = |name: &str| {
        settings
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["value"].as_str())
            .unwrap_or_else(|| panic!("the overlay sets {name}"))
            .to_owned()
    };
    assert_eq!(value("OUTBOX_STREAM_REPLICAS"), "3");
    let seeds = value("NATS_URL");
    let seeds: Vec<&str> = seeds.split(',').collect();
    assert_eq!(seeds.len(), 3, "three seed URLs: {seeds:?}");
    assert!(
        seeds
            .iter()
            .all(|s| s.starts_with("nats://") && s.ends_with(":4222")),
        "{seeds:?}"
    );
}
