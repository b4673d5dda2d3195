//! Pod Security "restricted" (the baseline rules included), as the
//! admission controller would judge a pod spec, plus a read-only root
//! filesystem, which it does not ask for and we do.

use crate::common::tools::strings;
use serde_json::{json, Value};

/// Every container of a pod spec, init and ephemeral ones included.
fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(move |list| pod[list].as_array().into_iter().flatten())
}

/// The volume types Pod Security "restricted" allows.
const RESTRICTED_VOLUMES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
/// The sysctls Pod Security "baseline" allows.
const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];
const SELINUX_TYPES: [&str; 5] = [
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// What keeps a pod spec from Pod Security "restricted" (the baseline rules
/// included), plus a writable root filesystem; empty when it passes.
pub fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut violations = Vec::new();
    let pod_context = &pod["securityContext"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[host] == true {
            violations.push(format!("{host} is true"));
        }
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let types: Vec<&String> = volume
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "name")
            .collect();
        if !types
            .iter()
            .all(|t| RESTRICTED_VOLUMES.contains(&t.as_str()))
        {
            violations.push(format!("volume {} is of type {types:?}", volume["name"]));
        }
    }
    for sysctl in pod_context["sysctls"].as_array().into_iter().flatten() {
        let name = sysctl["name"].as_str().unwrap_or_default();
        if !SAFE_SYSCTLS.contains(&name) {
            violations.push(format!("sysctl {name} is not a safe one"));
        }
    }
    let seccomp_ok = |context: &Value| {
        matches!(
            context["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        )
    };
    for container in containers(pod) {
        let name = container["name"].as_str().unwrap_or("?");
        let context = &container["securityContext"];
        let mut fail = |what: String| violations.push(format!("container {name}: {what}"));
        // Both levels: the container's setting wins over the pod's.
        let either = |field: &str| {
            if context[field].is_null() {
                &pod_context[field]
            } else {
                &context[field]
            }
        };
        if context["privileged"] == true {
            fail("privileged".into());
        }
        if context["allowPrivilegeEscalation"] != false {
            fail("allowPrivilegeEscalation is not false".into());
        }
        if either("runAsNonRoot") != true {
            fail("runAsNonRoot is not true".into());
        }
        if either("runAsUser") == 0 {
            fail("runAsUser is 0".into());
        }
        let seccomp = if context["seccompProfile"].is_null() {
            seccomp_ok(pod_context)
        } else {
            seccomp_ok(context)
        };
        if !seccomp {
            fail("seccompProfile is not RuntimeDefault or Localhost".into());
        }
        let drop = strings(&context["capabilities"]["drop"]);
        if !drop.contains(&"ALL") {
            fail(format!("capabilities drop {drop:?}, not ALL"));
        }
        let add = strings(&context["capabilities"]["add"]);
        if add.iter().any(|c| *c != "NET_BIND_SERVICE") {
            fail(format!("capabilities add {add:?}"));
        }
        if either("windowsOptions")["hostProcess"] == true {
            fail("a Windows host process".into());
        }
        if matches!(context["procMount"].as_str(), Some(m) if m != "Default") {
            fail(format!("procMount {}", context["procMount"]));
        }
        if either("appArmorProfile")["type"] == "Unconfined" {
            fail("AppArmor Unconfined".into());
        }
        let selinux = either("seLinuxOptions");
        if !SELINUX_TYPES.contains(&selinux["type"].as_str().unwrap_or(""))
            || !selinux["user"].is_null()
            || !selinux["role"].is_null()
        {
            fail(format!("seLinuxOptions {selinux}"));
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().unwrap_or(0) != 0 {
                fail(format!("hostPort {}", port["hostPort"]));
            }
        }
        if context["readOnlyRootFilesystem"] != true {
            fail("readOnlyRootFilesystem is not true".into());
        }
    }
    violations
}

#[test]
fn the_restricted_check_finds_each_violation() {
    let good = json!({
        "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "ok", "securityContext": {
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "s", "secret": {"secretName": "x"}}]
    });
    assert_eq!(restricted_violations(&good), Vec::<String>::new());

    let bad = json!({
        "hostNetwork": true, "hostPID": true, "hostIPC": true,
        "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
        "initContainers": [{"name": "init", "securityContext": {
            "runAsNonRoot": true, "seccompProfile": {"type": "Unconfined"},
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}}}],
        "containers": [{"name": "bad", "ports": [{"containerPort": 80, "hostPort": 80}],
            "securityContext": {"privileged": true, "runAsUser": 0, "procMount": "Unmasked",
                "seLinuxOptions": {"user": "root"}, "appArmorProfile": {"type": "Unconfined"},
                "capabilities": {"add": ["SYS_ADMIN"]}}}],
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}]
    });
    let found = restricted_violations(&bad).join("\n");
    for expected in [
        "hostNetwork is true",
        "hostPID is true",
        "hostIPC is true",
        "sysctl kernel.msgmax",
        "container init: seccompProfile",
        "container bad: privileged",
        "container bad: allowPrivilegeEscalation",
        "container bad: runAsNonRoot",
        "container bad: runAsUser is 0",
        "container bad: seccompProfile",
        "container bad: capabilities drop",
        "container bad: capabilities add [\"SYS_ADMIN\"]",
        "container bad: procMount",
        "container bad: AppArmor",
        "container bad: seLinuxOptions",
        "container bad: hostPort 80",
        "container bad: readOnlyRootFilesystem",
        "volume \"host\" is of type [\"hostPath\"]",
    ] {
        assert!(found.contains(expected), "{expected:?} not in:\n{found}");
    }
}
