//! The way in to the refresher from outside it: admissions ask for a namespace to be retried,
//! the shared Namespace watch passes on changes. Apart from `leadership`, which opens it when
//! this replica's refresher starts and closes it when it stops, so its users need not know
//! whether this replica refreshes at all.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Namespace;
use tokio::sync::mpsc;

type Slot<T> = Arc<Mutex<Option<mpsc::UnboundedSender<T>>>>;

/// What reaches the running refresher, if this replica runs one: namespaces that admissions
/// could not finish, and the changes the shared Namespace watch sees. Sending never blocks, and
/// without a refresher nothing is kept.
#[derive(Clone, Default)]
pub struct Inbox {
    retry: Slot<String>,
    namespaces: Slot<Arc<Namespace>>,
}

/// The receiving ends of an [`Inbox`], for one refresher.
pub(crate) struct Feeds {
    pub retry: mpsc::UnboundedReceiver<String>,
    pub namespaces: mpsc::UnboundedReceiver<Arc<Namespace>>,
}

fn send<T>(slot: &Slot<T>, value: T) {
    if let Some(tx) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = tx.send(value);
    }
}

fn set<T>(slot: &Slot<T>, tx: Option<mpsc::UnboundedSender<T>>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = tx;
}

impl Inbox {
    /// Asks the refresher to try the namespace again soon. (Without one, the leader's own
    /// retries and watches cover it.)
    pub(crate) fn retry(&self, namespace: &str) {
        send(&self.retry, namespace.to_string());
    }

    /// Tells the refresher that the Namespace changed.
    pub(crate) fn namespace_changed(&self, namespace: Arc<Namespace>) {
        send(&self.namespaces, namespace);
    }

    /// Starts keeping what is sent, for the refresher that starts now.
    pub(super) fn open(&self) -> Feeds {
        let (retry, retry_rx) = mpsc::unbounded_channel();
        let (namespaces, namespaces_rx) = mpsc::unbounded_channel();
        set(&self.retry, Some(retry));
        set(&self.namespaces, Some(namespaces));
        Feeds {
            retry: retry_rx,
            namespaces: namespaces_rx,
        }
    }

    /// Stops keeping what is sent: the refresher has stopped.
    pub(super) fn close(&self) {
        set(&self.retry, None);
        set(&self.namespaces, None);
    }
}
