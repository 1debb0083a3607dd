//! Group commit: durable writes that arrive together share one write transaction and one fsync.
//!
//! redb has one writer, and a durable commit waits for the disk (several milliseconds on the
//! machines we measure on), so one transaction per CreateSession capped the embedded store at
//! about 200 creates per second whatever the concurrency. Every write now goes to one committer
//! thread (a rate-limit check, `Durability::None` on its own, rides along and is committed
//! durably when a durable write shares its transaction). When the writer's turn comes it takes every job waiting (up
//! to [`MAX_BATCH`]: those that arrived while the previous commit waited for the disk), runs them
//! in order in one transaction, commits it once, and only then answers each caller: nothing is
//! acknowledged before the commit that holds it is on disk, and nothing is visible to readers
//! before that either (it is one transaction).
//!
//! A job that fails (its closure returns an error or panics) must not take the others' writes
//! with it, and a transaction cannot be partly rolled back. So the transaction is aborted, the
//! failing job gets its error, and the others run again, in the same order, in a new
//! transaction: they see exactly the state they would have seen had the failing job never
//! been sent. That is why a durable write's closure is `FnMut` (it may run more than once and
//! must give the same result on the same state).
//!
//! A rate-limit decision is answered before the commit, once every job of its transaction has
//! run ([`Committer::submit_early`]): limiter state is read and written only by jobs on this
//! thread, which run in order in the same transaction, so no decision can see a state that
//! another decision did not leave. Without this a CreateSession waited for two commits (its
//! `session_create` check, then the session). If the commit then fails, the counts of that
//! transaction are forgotten, as a crash forgets the last counts of `Durability::None`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use super::*;

/// Most jobs in one transaction.
pub(super) const MAX_BATCH: usize = 256;

/// One durable write waiting for the committer.
trait Job: Send {
    /// Whether the write must be on disk before it is answered.
    fn durable(&self) -> bool;
    /// Whether the caller is answered once the transaction has run, before its commit.
    fn early(&self) -> bool;
    /// Answers the caller now with the value of its last run (an early job, before the commit).
    fn answer_now(&mut self);
    /// Runs the write in `tx` and keeps its value for [`Job::answer`].
    fn run(&mut self, tx: &WriteTransaction) -> Result<()>;
    /// Answers the caller: its value if `committed` is `Ok`, else the error.
    fn answer(self: Box<Self>, committed: Result<()>);
}

struct Typed<T, F> {
    durable: bool,
    early: bool,
    write: F,
    value: Option<T>,
    /// Taken by the answer: an early job answered before the commit is not answered again.
    reply: Option<tokio::sync::oneshot::Sender<Result<T>>>,
}

impl<T, F> Job for Typed<T, F>
where
    T: Send,
    F: FnMut(&WriteTransaction) -> Result<T> + Send,
{
    fn durable(&self) -> bool {
        self.durable
    }

    fn early(&self) -> bool {
        self.early
    }

    fn answer_now(&mut self) {
        if let (Some(reply), Some(value)) = (self.reply.take(), self.value.take()) {
            let _ = reply.send(Ok(value));
        }
    }

    fn run(&mut self, tx: &WriteTransaction) -> Result<()> {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (self.write)(tx)))
            .unwrap_or_else(|_| Err(Error::internal("embedded store: a write panicked")))?;
        self.value = Some(outcome);
        Ok(())
    }

    fn answer(self: Box<Self>, committed: Result<()>) {
        let Some(reply) = self.reply else { return };
        let value = self.value;
        let result = committed
            .and_then(|()| value.ok_or_else(|| Error::internal("embedded store: a committed write has no value")));
        // The caller may have gone (a cancelled call); its write stands either way.
        let _ = reply.send(result);
    }
}

/// The committer thread's handle: dropping the last one ends the thread and waits for it, so
/// the database is closed when the last store is dropped (a test may reopen it at once).
pub(super) struct Committer {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").field("commits", &self.commits()).finish_non_exhaustive()
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Committer {
    /// Starts the committer thread over `db`; it also writes the pending idle slides first in
    /// each transaction, like every other write.
    pub(super) fn start(db: Arc<Database>, slides: Arc<slides::PendingSlides>) -> Result<Committer> {
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        let thread = std::thread::Builder::new()
            .name("embedded-commit".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    commit_batch(&db, &slides, &queue, vec![first], &counted);
                }
            })
            .map_err(|e| Error::unavailable(format!("embedded store: cannot start the committer thread: {e}")))?;
        Ok(Committer { jobs: Some(jobs), thread: Some(thread), commits })
    }

    /// Runs `write` in the next group commit and answers once it is committed (on disk, if
    /// `durable`).
    pub(super) async fn submit<T, F>(&self, durable: bool, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        self.send(durable, false, write).await
    }

    /// Runs `write` (not durable) in the next transaction and answers once every job of that
    /// transaction has run, before its commit: see the module's notes.
    pub(super) async fn submit_early<T, F>(&self, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        self.send(false, true, write).await
    }

    async fn send<T, F>(&self, durable: bool, early: bool, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        let stopped = || Error::unavailable("embedded store: the committer has stopped");
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Box<dyn Job> = Box::new(Typed { durable, early, write, value: None, reply: Some(reply) });
        self.jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Commits made so far (each may hold many writes).
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// Commits `batch` and whatever else is queued once the writer's turn comes (the jobs that
/// arrived while the previous commit was waiting for the disk).
fn commit_batch(
    db: &Database,
    slides: &slides::PendingSlides,
    queue: &mpsc::Receiver<Box<dyn Job>>,
    mut batch: Vec<Box<dyn Job>>,
    commits: &AtomicU64,
) {
    let mut first_attempt = true;
    while !batch.is_empty() {
        let tx = db.begin_write();
        if std::mem::take(&mut first_attempt) {
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        let mut tx = match tx {
            Ok(tx) => tx,
            Err(e) => return fail_all(batch, &e),
        };
        let durable = batch.iter().any(|job| job.durable());
        let durability = if durable { Durability::Immediate } else { Durability::None };
        if let Err(e) = tx.set_durability(durability) {
            return fail_all(batch, &e);
        }
        if durable {
            // Keeps recovery after a crash quick instead of a full repair scan.
            tx.set_quick_repair(true);
        }
        let pending = slides.take();
        slides::write_slides(&tx, &pending);
        let mut failed = None;
        for (index, job) in batch.iter_mut().enumerate() {
            if let Err(e) = job.run(&tx) {
                failed = Some((index, e));
                break;
            }
        }
        if let Some((index, error)) = failed {
            let _ = tx.abort();
            slides.restore(pending);
            batch.remove(index).answer(Err(error));
            continue;
        }
        for job in batch.iter_mut().filter(|job| job.early()) {
            job.answer_now();
        }
        let committed = tx.commit();
        commits.fetch_add(1, Ordering::Relaxed);
        if committed.is_err() {
            slides.restore(pending);
        }
        let message = committed.err().map(|e| e.to_string());
        for job in batch.drain(..) {
            job.answer(match &message {
                None => Ok(()),
                Some(e) => Err(unavailable(e)),
            });
        }
    }
}

fn fail_all(batch: Vec<Box<dyn Job>>, error: &dyn std::fmt::Display) {
    let message = error.to_string();
    for job in batch {
        job.answer(Err(unavailable(&message)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use redb::backends::InMemoryBackend;
    use redb::{StorageBackend, TableDefinition};

    use super::*;

    const TABLE: TableDefinition<&str, &str> = TableDefinition::new("t");

    /// Syncs wait for permits the test hands out, one at a time: it can hold a commit in its
    /// fsync and watch what is answered meanwhile.
    #[derive(Debug, Default)]
    struct Gate {
        state: Mutex<(usize, usize)>,
        changed: Condvar,
    }

    impl Gate {
        fn grant(&self, permits: usize) {
            self.state.lock().unwrap().0 += permits;
            self.changed.notify_all();
        }

        /// True once a sync is waiting and no permit is left for it.
        fn blocked(&self) -> bool {
            let (permits, waiting) = *self.state.lock().unwrap();
            waiting > 0 && permits == 0
        }
    }

    /// Opens the gate when dropped, so that a failing test ends instead of leaving the
    /// committer's thread (which the committer joins on drop) waiting in a sync.
    struct OpenOnDrop(Arc<Gate>);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.grant(usize::MAX / 2);
        }
    }

    #[derive(Debug)]
    struct GatedBackend {
        inner: InMemoryBackend,
        gate: Arc<Gate>,
    }

    impl StorageBackend for GatedBackend {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.inner.write(offset, data)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            let mut state = self.gate.state.lock().unwrap();
            state.1 += 1;
            self.gate.changed.notify_all();
            while state.0 == 0 {
                state = self.gate.changed.wait(state).unwrap();
            }
            state.0 -= 1;
            state.1 -= 1;
            drop(state);
            self.inner.sync_data()
        }
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn insert(key: &'static str) -> impl FnMut(&WriteTransaction) -> Result<&'static str> + Send + 'static {
        move |tx| {
            tx.open_table(TABLE).map_err(unavailable)?.insert(key, "v").map_err(unavailable)?;
            Ok(key)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_early_answer_comes_before_the_fsync_and_a_durable_one_after_it() {
        let gate = Arc::new(Gate::default());
        gate.grant(usize::MAX / 2);
        let backend = GatedBackend { inner: InMemoryBackend::new(), gate: gate.clone() };
        let db = Arc::new(Database::builder().create_with_backend(backend).unwrap());
        let committer = Arc::new(Committer::start(db, Arc::default()).unwrap());
        gate.state.lock().unwrap().0 = 0;
        let _open = OpenOnDrop(gate.clone());

        // A durable write holds the committer in its fsync while the next two queue behind it.
        let first = tokio::spawn({
            let committer = committer.clone();
            async move { committer.submit(true, insert("first")).await }
        });
        eventually("the first commit waits for its fsync", || gate.blocked()).await;
        let durable = tokio::spawn({
            let committer = committer.clone();
            async move { committer.submit(true, insert("durable")).await }
        });
        let early = tokio::spawn({
            let committer = committer.clone();
            async move { committer.submit_early(insert("early")).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!durable.is_finished() && !early.is_finished(), "both wait behind the first commit");

        // Let the first commit finish, one sync at a time, and no further (the count of commits
        // moves before the committer starts the next transaction).
        while committer.commits() == 0 {
            gate.grant(1);
            eventually("the sync ran and another waits, or the first commit is done", || {
                committer.commits() > 0 || gate.blocked()
            })
            .await;
        }
        assert_eq!(first.await.unwrap().unwrap(), "first");

        // The next transaction holds both; its commit waits for a sync that is not granted.
        let early = tokio::time::timeout(Duration::from_secs(10), early)
            .await
            .expect("the early write is answered while its commit waits for the fsync");
        assert_eq!(early.unwrap().unwrap(), "early");
        eventually("the shared commit waits for its fsync", || gate.blocked()).await;
        assert!(!durable.is_finished(), "a durable write is answered only after its fsync");
        let before = committer.commits();
        gate.grant(usize::MAX / 2);
        assert_eq!(durable.await.unwrap().unwrap(), "durable");
        assert_eq!(committer.commits(), before + 1, "the early and the durable write shared one commit");
    }
}
