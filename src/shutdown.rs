//! Shutdown: one trigger (SIGTERM/SIGINT, or a test) that every task can wait on.

use tokio::sync::watch;

/// Waits for shutdown. Cheap to clone; every clone sees the same trigger.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers the shutdown of every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    pub fn is_fired(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the trigger fired (or was dropped).
    pub async fn fired(&mut self) {
        let _ = self.rx.wait_for(|fired| *fired).await;
    }

    /// Runs `work` unless shutdown comes first: `None` then, and `work` is
    /// dropped where it stands. For waits on servers (connecting, a JetStream
    /// request, a full queue) that must not hold up a SIGTERM.
    pub async fn unless<F: std::future::Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.fired() => None,
            done = work => Some(done),
        }
    }
}

/// A trigger fired by the first SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let (trigger, shutdown) = channel();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing what is in flight"),
            _ = int.recv() => tracing::info!("SIGINT: finishing what is in flight"),
        }
        trigger.fire();
    });
    Ok(shutdown)
}
