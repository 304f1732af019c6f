//! Connections: a pool for reads, one writing connection with group commit.
//!
//! Every write of this process goes through one task that owns a
//! connection. It takes whatever writes queued up while the previous batch
//! was committing, runs each in its own savepoint (one failing write does
//! not undo the others; plain event appends go without, several to a
//! statement, see [`Work::Append`]) and commits them together: one WAL
//! flush for the batch, as the embedded engine does.
//!
//! **Positions with several writers.** A batch first locks the single row
//! of `stream_head` (`SELECT ... FOR UPDATE`), hands out the positions after
//! it, and moves it in the same transaction. Batches of different processes
//! therefore take positions one after the other, and a position becomes
//! visible (in `stream_head`, or as a row) only when every position below it
//! is committed: a reader that reads the head first and then the rows up to
//! it never sees a gap that a write still in flight would fill later. The
//! price is that the processes' batches commit one at a time; each batch
//! carries every write its process queued meanwhile.

use std::{
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use kabar_store::{
    AppendOutcome, Change, CommitListener, CommittedBatch, EventWrite, StoreError, StoreObserver, StoreOp, StoreResult, StoredEvent,
    StreamPos, StreamUpdate,
};
use sqlx::{
    Connection, PgConnection, Row,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};
use tokio::sync::{mpsc, oneshot};

/// Each entry brings the schema from its index's version to the next.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
];
const MAX_BATCH: usize = 512;
/// At most this many consecutive plain appends are run together.
const MAX_APPENDS_PER_RUN: usize = 256;
/// How long the writer tries to reconnect before failing a batch.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An arbitrary number naming Kabar's migration lock among advisory locks.
const MIGRATION_LOCK: i64 = 0x006b_6162_6172;

/// Maps a database error to the store's error: a uniqueness violation is a
/// `Conflict(what)`, a lost or unreachable server is `Unavailable`.
pub(crate) fn db_error(what: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |e| classify(e, Some(what))
}

pub(crate) fn backend(e: sqlx::Error) -> StoreError {
    classify(e, None)
}

fn classify(e: sqlx::Error, conflict: Option<&str>) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => match conflict {
            Some(what) => StoreError::Conflict(what.to_owned()),
            None => StoreError::Backend(e.to_string()),
        },
        // Connection-level failures: the server is down, restarting or
        // unreachable; the same request may work in a moment.
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) => {
            // Connection exceptions and operator intervention (shutdown).
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Hands out positions inside one batch, and collects the changes made at them.
pub(crate) struct Positions {
    next: StreamPos,
    updates: Vec<StreamUpdate>,
}

impl Positions {
    pub(crate) fn allocate(&mut self) -> StreamPos {
        let p = self.next;
        self.next += 1;
        p
    }

    /// The position the next [`allocate`](Self::allocate) hands out.
    pub(crate) fn peek(&self) -> StreamPos {
        self.next
    }

    /// Notes `write` appended at `pos`.
    pub(crate) fn appended(&mut self, pos: StreamPos, write: EventWrite) {
        self.event(StoredEvent {
            pos,
            pdu: write.pdu,
            txn: write.txn,
            redacted_by: None,
            prev: write.prev,
        });
    }

    /// Notes an appended event (the events table is its record in the stream).
    pub(crate) fn event(&mut self, event: StoredEvent) {
        self.updates.push(StreamUpdate {
            pos: event.pos,
            change: Change::Event(Arc::new(event)),
        });
    }

    /// Records a change that is not an event at `pos`, in the stream table.
    pub(crate) async fn change(&mut self, conn: &mut PgConnection, pos: StreamPos, change: Change) -> StoreResult<()> {
        let (user, room, device) = change
            .record()
            .ok_or_else(|| StoreError::Backend("events are recorded by their row".into()))?;
        sqlx::query("INSERT INTO stream_changes (pos, kind, user_id, room_id, device_id) VALUES ($1, $2, $3, $4, $5)")
            .bind(pos as i64)
            .bind(change.kind())
            .bind(user)
            .bind(room)
            .bind(device)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        self.updates.push(StreamUpdate { pos, change });
        Ok(())
    }
}

type RunFn = Box<dyn for<'c> FnOnce(&'c mut PgConnection, &'c mut Positions) -> BoxFuture<'c, bool> + Send>;
type FinishFn = Box<dyn FnOnce(StoreResult<()>) + Send>;

/// One write and how to answer its caller once its batch committed.
struct WriteJob {
    work: Work,
    finish: FinishFn,
}

enum Work {
    /// Does the write inside the batch (true if it succeeded), in its own
    /// savepoint, so that its failure undoes only it.
    Run(RunFn),
    /// A plain event append (neither state nor redaction). Consecutive ones
    /// go to the database as one statement per layer ([`append_run`])
    /// without savepoints: it fails
    /// only when the database does, and then the whole batch fails and
    /// nothing of it is kept. `outcome` gets the append's result before the
    /// commit; `finish` answers with it once the commit is durable.
    Append { write: Box<EventWrite>, outcome: OutcomeSlot },
}

/// Where an append's outcome waits for its commit.
type OutcomeSlot = Arc<Mutex<Option<AppendOutcome>>>;

fn run_fn<F>(f: F) -> RunFn
where
    F: for<'c> FnOnce(&'c mut PgConnection, &'c mut Positions) -> BoxFuture<'c, bool> + Send + 'static,
{
    Box::new(f)
}

type ListenerSlot = Arc<Mutex<Option<Arc<dyn CommitListener>>>>;

pub(crate) struct Engine {
    pub(crate) pool: PgPool,
    writer: mpsc::UnboundedSender<WriteJob>,
    committed: Arc<AtomicU64>,
    listener: ListenerSlot,
    observer: Option<Arc<dyn StoreObserver>>,
}

impl Engine {
    pub(crate) async fn connect(url: &str, pool_size: u32, observer: Option<Arc<dyn StoreObserver>>) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Backend(format!("not a PostgreSQL URL: {e}")))?;
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        migrate(&mut conn).await?;
        let head: i64 = sqlx::query("SELECT pos FROM stream_head")
            .fetch_one(&mut conn)
            .await
            .map_err(backend)?
            .try_get(0)
            .map_err(corrupt)?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        let committed = Arc::new(AtomicU64::new(head as u64));
        let listener: ListenerSlot = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_loop(options, Some(conn), rx, committed.clone(), listener.clone()));
        Ok(Self {
            pool,
            writer: tx,
            committed,
            listener,
            observer,
        })
    }

    pub(crate) fn committed(&self) -> StreamPos {
        self.committed.load(Ordering::Acquire)
    }

    /// Queues a plain event append (see [`Work::Append`]) for the next
    /// group commit before returning; the future answers once it is durable.
    pub(crate) fn queue_plain(&self, write: EventWrite) -> impl Future<Output = StoreResult<AppendOutcome>> + Send + 'static {
        let outcome = Arc::new(Mutex::new(None));
        let answer = outcome.clone();
        self.queue_job(
            Work::Append {
                write: Box::new(write),
                outcome,
            },
            move || {
                answer
                    .lock()
                    .ok()
                    .and_then(|mut o| o.take())
                    .ok_or_else(|| StoreError::Backend("the append never ran".into()))
            },
        )
    }

    /// Notes a head read from the database (another process's commits).
    pub(crate) fn saw_head(&self, head: StreamPos) {
        self.committed.fetch_max(head, Ordering::AcqRel);
    }

    pub(crate) fn set_listener(&self, listener: Arc<dyn CommitListener>) {
        if let Ok(mut slot) = self.listener.lock() {
            *slot = Some(listener);
        }
    }

    pub(crate) fn observe(&self, op: StoreOp, started: Instant) {
        if let Some(o) = &self.observer {
            o.observe(op, started.elapsed());
        }
    }

    /// Runs `f` on the writing connection inside the next group commit (in
    /// its own savepoint), and answers once that commit is durable.
    pub(crate) async fn write<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection, &'c mut Positions) -> BoxFuture<'c, StoreResult<R>> + Send + 'static,
    {
        self.queue(f).await
    }

    /// [`write`](Self::write), queued before this returns (jobs run in the
    /// order they were queued).
    pub(crate) fn queue<R, F>(&self, f: F) -> impl Future<Output = StoreResult<R>> + Send + 'static
    where
        R: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection, &'c mut Positions) -> BoxFuture<'c, StoreResult<R>> + Send + 'static,
    {
        let slot: Arc<Mutex<Option<StoreResult<R>>>> = Arc::new(Mutex::new(None));
        let ran = slot.clone();
        let run = run_fn(move |c, p| {
            Box::pin(async move {
                let result = f(c, p).await;
                let ok = result.is_ok();
                if let Ok(mut s) = ran.lock() {
                    *s = Some(result);
                }
                ok
            })
        });
        self.queue_job(Work::Run(run), move || {
            slot.lock()
                .ok()
                .and_then(|mut s| s.take())
                .unwrap_or_else(|| Err(StoreError::Backend("the write never ran".into())))
        })
    }

    /// Sends `work` to the writer; once its batch committed, the future
    /// answers with `result()` (what the work left behind), or with the
    /// commit's error.
    fn queue_job<R: Send + 'static>(
        &self,
        work: Work,
        result: impl FnOnce() -> StoreResult<R> + Send + 'static,
    ) -> impl Future<Output = StoreResult<R>> + Send + 'static {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let finish: FinishFn = Box::new(move |commit| {
            let _ = tx.send(commit.and_then(|()| result()));
        });
        let queued = self
            .writer
            .send(WriteJob { work, finish })
            .map_err(|_| StoreError::Backend("the writer stopped".into()));
        let observer = self.observer.clone();
        async move {
            queued?;
            let result = rx.await.map_err(|_| StoreError::Backend("the writer stopped".into()))?;
            if let Some(o) = &observer {
                o.observe(StoreOp::Write, started.elapsed());
            }
            result
        }
    }
}

async fn migrate(conn: &mut PgConnection) -> StoreResult<()> {
    let mut tx = conn.begin().await.map_err(backend)?;
    // Two processes starting on an empty database migrate one after the other.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    sqlx::query("CREATE TABLE IF NOT EXISTS kabar_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let version: Option<i32> = sqlx::query("SELECT MAX(version) FROM kabar_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?
        .try_get(0)
        .map_err(corrupt)?;
    let version = version.unwrap_or(0) as usize;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this Kabar (expected at most {})",
            MIGRATIONS.len()
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        sqlx::raw_sql(migration).execute(&mut *tx).await.map_err(backend)?;
        sqlx::query("INSERT INTO kabar_schema (version) VALUES ($1)")
            .bind((i + 1) as i32)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tracing::info!(version = i + 1, "PostgreSQL schema migrated");
    }
    tx.commit().await.map_err(backend)
}

async fn writer_loop(
    options: PgConnectOptions,
    mut conn: Option<PgConnection>,
    mut rx: mpsc::UnboundedReceiver<WriteJob>,
    committed: Arc<AtomicU64>,
    listener: ListenerSlot,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if conn.is_none() {
            // Bounded: an unreachable host must not hold the writes queued
            // behind this batch for a TCP timeout.
            match tokio::time::timeout(RECONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
                Ok(Ok(c)) => {
                    tracing::info!("the writing connection to PostgreSQL is back");
                    conn = Some(c);
                }
                outcome => {
                    let e = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RECONNECT_TIMEOUT:?}"),
                    };
                    let message = format!("cannot connect to PostgreSQL: {e}");
                    for job in batch {
                        (job.finish)(Err(StoreError::Unavailable(message.clone())));
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut finishes = Vec::with_capacity(batch.len());
        let outcome = run_batch(c, batch, &mut finishes).await;
        match outcome {
            Ok(batch) => {
                committed.fetch_max(batch.head, Ordering::AcqRel);
                let listener = listener.lock().ok().and_then(|l| l.clone());
                if let Some(listener) = listener
                    && batch.head > batch.after
                    && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener.committed(&batch))).is_err()
                {
                    tracing::error!(head = batch.head, "the commit listener panicked");
                }
                for finish in finishes {
                    finish(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                if let Some(c) = conn.as_mut()
                    && sqlx::query("ROLLBACK").execute(&mut *c).await.is_err()
                {
                    // The connection is gone: open a new one for the next batch.
                    conn = None;
                }
                if matches!(e, StoreError::Unavailable(_)) {
                    conn = None;
                }
                for finish in finishes {
                    finish(Err(e.clone()));
                }
            }
        }
    }
}

/// Runs consecutive plain appends as few statements as their rooms allow:
/// the first append of each room in one, the second of each in the next,
/// and so on, so that a room's appends still run in the order they were
/// queued and each sees the one before it (a room's next event is often
/// built on the previous one, queued while it was being committed).
async fn append_run(c: &mut PgConnection, positions: &mut Positions, run: Vec<(EventWrite, OutcomeSlot)>) -> StoreResult<()> {
    let mut per_room: std::collections::HashMap<ruma::OwnedRoomId, usize> = std::collections::HashMap::new();
    let mut layers: Vec<Vec<(EventWrite, OutcomeSlot)>> = vec![];
    for (write, slot) in run {
        let seen = per_room.entry(write.pdu.room_id.clone()).or_default();
        if layers.len() <= *seen {
            layers.push(vec![]);
        }
        layers[*seen].push((write, slot));
        *seen += 1;
    }
    for layer in layers {
        let (writes, slots): (Vec<_>, Vec<_>) = layer.into_iter().unzip();
        let outcomes = crate::rooms::insert_plain_events(c, positions, writes).await?;
        for (slot, outcome) in slots.into_iter().zip(outcomes) {
            if let Ok(mut s) = slot.lock() {
                *s = Some(outcome);
            }
        }
    }
    Ok(())
}

/// Runs one batch in one transaction; `finishes` gets every job's answer
/// function, to be called with the commit's outcome.
async fn run_batch(c: &mut PgConnection, batch: Vec<WriteJob>, finishes: &mut Vec<FinishFn>) -> StoreResult<CommittedBatch> {
    let jobs = batch.into_iter();
    let begun = async {
        // One round trip for both: the simple-query protocol takes several
        // statements at once.
        let rows = sqlx::Executor::fetch_all(&mut *c, "BEGIN; SELECT pos FROM stream_head FOR UPDATE")
            .await
            .map_err(backend)?;
        let head: i64 = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("stream_head has no row".into()))?
            .try_get(0)
            .map_err(corrupt)?;
        Ok::<_, StoreError>(head as StreamPos)
    }
    .await;
    let head = match begun {
        Ok(head) => head,
        Err(e) => {
            finishes.extend(jobs.map(|j| j.finish));
            return Err(e);
        }
    };
    let mut positions = Positions {
        next: head + 1,
        updates: vec![],
    };
    let mut jobs = jobs.peekable();
    while let Some(job) = jobs.next() {
        finishes.push(job.finish);
        let run = match job.work {
            Work::Run(run) => run,
            Work::Append { write, outcome } => {
                // This append and the appends right after it.
                let mut run = vec![(*write, outcome)];
                while run.len() < MAX_APPENDS_PER_RUN
                    && let Some(next) = jobs.next_if(|j| matches!(j.work, Work::Append { .. }))
                {
                    finishes.push(next.finish);
                    if let Work::Append { write, outcome } = next.work {
                        run.push((*write, outcome));
                    }
                }
                if let Err(e) = append_run(c, &mut positions, run).await {
                    // The statement failed, which aborted the transaction.
                    finishes.extend(jobs.map(|j| j.finish));
                    return Err(e);
                }
                continue;
            }
        };
        let (before, updates_before) = (positions.next, positions.updates.len());
        if let Err(e) = sqlx::query("SAVEPOINT job").execute(&mut *c).await {
            finishes.extend(jobs.map(|j| j.finish));
            return Err(backend(e));
        }
        let ok = run(c, &mut positions).await;
        if !ok {
            positions.next = before;
            positions.updates.truncate(updates_before);
            if let Err(e) = sqlx::query("ROLLBACK TO SAVEPOINT job").execute(&mut *c).await {
                finishes.extend(jobs.map(|j| j.finish));
                return Err(backend(e));
            }
        }
        if let Err(e) = sqlx::query("RELEASE SAVEPOINT job").execute(&mut *c).await {
            finishes.extend(jobs.map(|j| j.finish));
            return Err(backend(e));
        }
    }
    let last = positions.next - 1;
    // The head moves in the committing transaction, in the same round trip
    // as the commit (the text holds only our own integer).
    let commit = if last > head {
        format!("UPDATE stream_head SET pos = {last}; COMMIT")
    } else {
        "COMMIT".to_owned()
    };
    sqlx::Executor::execute(&mut *c, commit.as_str()).await.map_err(backend)?;
    let mut updates = positions.updates;
    updates.sort_by_key(|u| u.pos);
    Ok(CommittedBatch {
        after: head,
        head: last.max(head),
        updates,
    })
}
