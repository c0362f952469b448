//! Makes the in-process nonce ledger survive a restart (embedded store): every fresh nonce is
//! written to the store's nonce journal before its request is allowed, and the journal is read
//! back into the ledger at start. Requests that arrive together share one durable commit (group
//! commit), so the fsync is paid per batch, not per request.

use std::sync::Arc;

use keyfence_policy::{clock::Clock, nonce::NonceLedger};
use keyfence_store::{
    StoreResult,
    nonce_log::{JournalEntry, NonceJournal},
};
use tokio::sync::{mpsc, oneshot};

/// Nonces waiting for a commit; beyond this a request is refused rather than held.
const QUEUE: usize = 16_384;
/// The most nonces one commit writes.
const BATCH: usize = 4096;

type Pending = (JournalEntry, oneshot::Sender<Result<(), String>>);

/// The decision path's handle on the journal writer.
#[derive(Clone)]
pub struct Journal {
    queue: mpsc::Sender<Pending>,
}

impl Journal {
    /// Reads the journal back into `ledger` and starts the writer.
    pub fn start(
        journal: NonceJournal,
        ledger: &NonceLedger,
        clock: Arc<dyn Clock>,
    ) -> StoreResult<Journal> {
        for (fingerprint, forget_after) in journal.load(clock.now())? {
            ledger.restore(fingerprint, forget_after);
        }
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(rx, Arc::new(journal), clock));
        Ok(Journal { queue })
    }

    /// Returns once `entry` is on disk; an error means it is not, and the request must be refused.
    pub async fn record(&self, entry: JournalEntry) -> Result<(), String> {
        let (done, written) = oneshot::channel();
        self.queue
            .try_send((entry, done))
            .map_err(|_| "nonce journal overloaded".to_owned())?;
        written
            .await
            .map_err(|_| "nonce journal stopped".to_owned())?
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<Pending>,
    journal: Arc<NonceJournal>,
    clock: Arc<dyn Clock>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let (entries, waiting): (Vec<JournalEntry>, Vec<_>) = batch.drain(..).unzip();
        let journal = journal.clone();
        let now = clock.now();
        let result = tokio::task::spawn_blocking(move || journal.append(&entries, now))
            .await
            .map_err(|error| format!("nonce journal task failed: {error}"))
            .and_then(|written| written.map_err(|error| error.to_string()));
        if let Err(error) = &result {
            tracing::warn!(%error, "cannot write the nonce journal; refusing those requests");
        }
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}
