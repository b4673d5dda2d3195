//! The shipped dashboard and alert rules, proven against a real Prometheus
//! scraping a real tailer: every panel query parses and returns data, every
//! alert expression parses, and neither names a metric the tailer does not
//! export.

use crate::common::*;
use outbox_testkit::{free_port, repo_root, PrometheusServer};
use std::collections::BTreeSet;
use std::time::Duration;

fn dashboard() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("dashboards/outbox-tailer.json")).unwrap(),
    )
    .unwrap()
}

/// Every panel query, with Grafana's interval variables filled in.
fn panel_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "15s");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

/// Every alert expression in alerts.yml (the `expr:` lines).
fn alert_expressions() -> Vec<String> {
    std::fs::read_to_string(repo_root().join("dashboards/alerts.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(|e| e.trim().to_owned()))
        .collect()
}

/// Every alert's name in alerts.yml (the `- alert:` lines).
fn alert_names() -> Vec<String> {
    std::fs::read_to_string(repo_root().join("dashboards/alerts.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- alert:")
                .map(|e| e.trim().to_owned())
        })
        .collect()
}

/// `outbox_…` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("outbox_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_owned());
        i = end;
    }
    names
}

async fn query(prometheus: &str, expr: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let output = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_root().join("dashboards/alerts.yml"))
        .output()
        .expect("promtool (apt-get install prometheus; scripts/setup does)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(alert_names().len() >= 10, "{:?}", alert_names());
    assert_eq!(
        alert_expressions().len(),
        alert_names().len(),
        "one expression each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_works_against_a_live_tailer() {
    let env = Env::start().await;
    let db = env.db().await;
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let tailer = env.tailer(&["run", "--metrics-addr", &addr, "--stats-interval", "0.5"]);
    wait_streaming(&db, "event_outbox_tailer", &tailer).await;
    let prometheus = PrometheusServer::start(
        std::slice::from_ref(&addr),
        "outbox-tailer",
        &[repo_root().join("dashboards/alerts.yml")],
    )
    .unwrap();
    let prom = prometheus.url();

    // Events flow while Prometheus scrapes, so rates have samples to work on.
    let js = env.js().await;
    for round in 0..8 {
        insert_events(&db, &format!("chat-{round}"), 0, 50).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_all_published(&db, &js, "EVENTS", 400, Duration::from_secs(60)).await;
    wait_for(
        "Prometheus to see the published events",
        Duration::from_secs(60),
        || async {
            let result = query(&prom, "sum(outbox_events_published_total)").await;
            let value = result["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned);
            (value.as_deref() == Some("400")).then_some(())
        },
    )
    .await;

    // Rates need several samples of each series: wait for a few more scrapes.
    wait_for(
        "several scrapes of the counters",
        Duration::from_secs(60),
        || async {
            let result = query(
                &prom,
                "min(count_over_time(outbox_events_published_total[1m]))",
            )
            .await;
            let samples: f64 = result["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            (samples >= 3.0).then_some(())
        },
    )
    .await;

    // Nothing may name a metric the tailer does not export.
    let scrape = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    let used: BTreeSet<String> = panel_queries()
        .iter()
        .map(|(_, e)| e.clone())
        .chain(alert_expressions())
        .flat_map(|e| metric_names(&e))
        .collect();
    let unknown: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboards name metrics the tailer does not export: {unknown:?}"
    );

    // Every panel query parses and returns data.
    for (title, expr) in panel_queries() {
        let result = query(&prom, &expr).await;
        assert_eq!(result["status"], "success", "{title}: {expr}: {result}");
        let series = result["data"]["result"].as_array().map_or(0, Vec::len);
        assert!(series > 0, "panel {title:?} returned no data: {expr}");
    }
    // Every alert expression parses (most return nothing on a healthy tailer).
    for expr in alert_expressions() {
        let result = query(&prom, &expr).await;
        assert_eq!(result["status"], "success", "{expr}: {result}");
    }
    // And Prometheus loaded and evaluates all of them; none fires on a healthy tailer.
    let rules: serde_json::Value = reqwest::get(format!("{prom}/api/v1/rules"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), alert_names().len());
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(
            rule["state"], "inactive",
            "a healthy tailer fires nothing: {rule}"
        );
    }
}
