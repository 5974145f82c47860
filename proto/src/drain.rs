//! Shutdown signalling: the caller owns a [`Trigger`]; every server holds a [`Watch`] and
//! stops accepting once it fires, then drains in-flight work until its own deadline.

use tokio::sync::watch;

#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Watch) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Watch(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }

    pub fn watch(&self) -> Watch {
        Watch(self.0.subscribe())
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

impl Watch {
    /// Resolves once shutdown has been requested (or the trigger is gone).
    pub async fn signaled(mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn is_signaled(&self) -> bool {
        *self.0.borrow()
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn os_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn watch_fires_once_triggered() {
        let (trigger, watch) = super::channel();
        assert!(!watch.is_signaled());
        let w2 = watch.clone();
        let task = tokio::spawn(w2.signaled());
        trigger.fire();
        task.await.unwrap();
        assert!(watch.is_signaled());
    }
}
