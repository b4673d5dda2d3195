//! Background tasks that must not die silently (the sweeper, the statistics
//! poller, retention). Each is watched: one that ends before shutdown, by a
//! panic or a return, is logged, counted (`outbox_task_failures_total`) and
//! ends the process with an error, so the container restarts it instead of
//! running on without catch-up.

use crate::error::{Error, Internal};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use std::future::Future;
use std::sync::Arc;
use tokio::task::JoinSet;

pub(crate) struct Supervised {
    tasks: JoinSet<&'static str>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

impl Supervised {
    pub(crate) fn new(shutdown: Shutdown, metrics: Arc<Metrics>) -> Supervised {
        Supervised {
            tasks: JoinSet::new(),
            shutdown,
            metrics,
        }
    }

    /// Runs `task` in the background under `name`.
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.spawn(async move {
            task.await;
            name
        });
    }

    /// Resolves with an error when a task ends before shutdown; never
    /// resolves otherwise (tasks ending because of shutdown are expected).
    pub(crate) async fn first_death(&mut self) -> Error {
        loop {
            let Some(ended) = self.tasks.join_next().await else {
                return std::future::pending().await;
            };
            if self.shutdown.is_fired() {
                continue;
            }
            let why = match ended {
                Ok(name) => Internal::TaskStopped(name),
                Err(join) if join.is_panic() => {
                    let message = join
                        .into_panic()
                        .downcast::<String>()
                        .map(|s| *s)
                        .or_else(|p| p.downcast::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|_| "a panic".to_owned());
                    Internal::TaskPanicked(message)
                }
                Err(join) => Internal::TaskCancelled(join),
            };
            self.metrics.task_failures.inc();
            tracing::error!("{why}; exiting so that the process is restarted");
            return why.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_before_shutdown_is_an_error_and_counted() {
        let (_trigger, shutdown) = crate::shutdown::channel();
        let metrics = Arc::new(Metrics::new());
        let mut tasks = Supervised::new(shutdown, metrics.clone());
        tasks.spawn("sleeper", std::future::pending());
        tasks.spawn("sweeper", async {});
        let error = tasks.first_death().await;
        assert_eq!(error.to_string(), "the sweeper stopped unexpectedly");
        tasks.spawn("poller", async { panic!("row 7 is odd") });
        let error = tasks.first_death().await;
        assert_eq!(
            error.to_string(),
            "a background task panicked: row 7 is odd"
        );
        assert_eq!(metrics.task_failures.get(), 2);
    }

    #[tokio::test]
    async fn tasks_ending_at_shutdown_are_expected() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let mut tasks = Supervised::new(shutdown.clone(), Arc::new(Metrics::new()));
        let mut waiting = shutdown.clone();
        tasks.spawn("sweeper", async move { waiting.fired().await });
        trigger.fire();
        let outcome =
            tokio::time::timeout(std::time::Duration::from_millis(200), tasks.first_death()).await;
        assert!(outcome.is_err(), "no error after a shutdown");
    }
}
