//! A throwaway Prometheus (Debian's `prometheus`) that scrapes given targets
//! every second and loads given rule files, on a free loopback port.

use super::process::{die_with_parent, find_binary, http_get, ready_or_kill, wait_or_kill};
use super::{start_on_free_port, HarnessError};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct PrometheusServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Scrapes `targets` (host:port) as job `job`, with `rule_files` loaded.
    pub fn start(
        targets: &[String],
        job: &str,
        rule_files: &[PathBuf],
    ) -> Result<PrometheusServer, HarnessError> {
        let binary = find_binary("prometheus", &[PathBuf::from("/usr/bin")]).ok_or_else(|| {
            HarnessError::NotFound {
                what: "prometheus".into(),
                hint: "apt-get install -y prometheus".into(),
            }
        })?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-tailer-prometheus-")
            .tempdir()
            .map_err(HarnessError::io("creating a temp dir"))?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("  - '{}'", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: '{job}'\n    static_configs:\n      - targets: [{}]\n",
            if rules.is_empty() { "  []".to_owned() } else { rules.join("\n") },
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)
            .map_err(HarnessError::io("writing prometheus.yml"))?;
        let mut server = PrometheusServer {
            child: None,
            port: 0,
            dir,
        };
        start_on_free_port(&mut server, |server, port| {
            server.port = port;
            server.spawn(&binary)
        })?;
        Ok(server)
    }

    fn spawn(&mut self, binary: &Path) -> Result<(), HarnessError> {
        let log = self.dir.path().join("prometheus.log");
        let out =
            std::fs::File::create(&log).map_err(HarnessError::io("creating the prometheus log"))?;
        let mut command = Command::new(binary);
        command
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                out.try_clone()
                    .map_err(HarnessError::io("cloning the log fd"))?,
            ))
            .stderr(Stdio::from(out));
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(HarnessError::io("starting prometheus"))?;
        let port = self.port;
        let child = ready_or_kill(
            child,
            &format!("prometheus on port {port}"),
            START_TIMEOUT,
            &log,
            || http_get(port, "/-/ready").is_some_and(|(s, _)| s == 200),
        )?;
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }
}
