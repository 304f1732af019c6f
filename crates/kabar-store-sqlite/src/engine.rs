//! Connections: one writer thread with group commit, a fixed set of reader threads.
//!
//! Reads run on a fixed number of threads, each owning one read-only
//! connection, fed from one queue. A burst of reads (thousands of syncs at
//! once) waits in that queue instead of spawning a thread and a connection
//! each, which would cost memory per waiting client.
//!
//! SQLite allows one writer at a time, so every write goes through a single
//! thread. It takes whatever writes have queued up while the previous batch was
//! committing, runs each in its own savepoint (one failing write does not undo
//! the others), and commits them with one fsync. Each caller is answered only
//! after that commit, so an acknowledged write is durable.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
};

use kabar_store::{Change, CommitListener, CommittedBatch, StoreError, StoreObserver, StoreOp, StoreResult, StreamPos, StreamUpdate};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

/// Each entry brings the schema from its index's version to the next; the
/// database's `user_version` says where it stands.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("e2ee.sql"),
    include_str!("v3.sql"),
    include_str!("v4.sql"),
    include_str!("v5.sql"),
];
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
const MAX_BATCH: usize = 512;
/// Reader threads: SQLite reads are short and CPU-bound, so a few more than
/// the cores keep them busy while one waits on the disk.
const READER_THREADS: usize = 4;

/// Hands out stream positions inside the writer thread, and collects the
/// changes made at them for the stream.
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

    /// Notes an appended event (the events table is its record in the stream).
    pub(crate) fn event(&mut self, event: kabar_store::StoredEvent) {
        self.updates.push(StreamUpdate {
            pos: event.pos,
            change: Change::Event(std::sync::Arc::new(event)),
        });
    }

    /// Records a change that is not an event at `pos`, in the stream table.
    pub(crate) fn change(&mut self, conn: &Connection, pos: StreamPos, change: Change) -> StoreResult<()> {
        let (user, room, device) = change
            .record()
            .ok_or_else(|| StoreError::Backend("events are recorded by their row".into()))?;
        exec(
            conn,
            "INSERT INTO stream_changes (pos, kind, user_id, room_id, device_id) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![pos as i64, change.kind(), user, room, device],
        )
        .map_err(backend)?;
        self.updates.push(StreamUpdate { pos, change });
        Ok(())
    }
}

type Reply = Box<dyn FnOnce(StoreResult<()>) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;
type WriteJob = Box<dyn FnOnce(&Connection, &mut Positions) -> (bool, Reply) + Send>;

/// Who is told of committed batches, once somebody listens.
type FeedSlot = Arc<Mutex<Option<Arc<dyn CommitListener>>>>;

pub(crate) struct Engine {
    writer: Mutex<Option<mpsc::Sender<WriteJob>>>,
    readers: Mutex<Option<mpsc::Sender<ReadJob>>>,
    committed: Arc<AtomicU64>,
    observer: Option<Arc<dyn StoreObserver>>,
    feed: FeedSlot,
}

pub(crate) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open(path: &Path, write: bool) -> StoreResult<Connection> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(backend)?;
    // FULL: the commit's fsync covers the WAL, so an acknowledged write survives
    // power loss too, not just a killed process. Group commit pays for it.
    // mmap: every commit invalidates the readers' page caches, and reading the
    // pages back through a mapping costs no system call or copy.
    // temp_store in memory: each write of a group commit runs in its own
    // savepoint, whose sub-journal (the pages as they were before the write)
    // otherwise goes to a temporary file, a write() per page; it is thrown
    // away at the commit, so it never needs a disk.
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=OFF; PRAGMA mmap_size=1073741824; PRAGMA temp_store=MEMORY;",
    )
    .map_err(backend)?;
    // Every statement is prepared once per connection and reused: parsing SQL
    // cost more than running it for the small statements of a send or a sync.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// More than the number of distinct statements the store runs.
const STATEMENT_CACHE: usize = 256;

/// Runs one statement through the connection's statement cache.
pub(crate) fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

impl Engine {
    pub(crate) fn open(path: &Path, observer: Option<Arc<dyn StoreObserver>>) -> StoreResult<Self> {
        let conn = open(path, true)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
        if (0..SCHEMA_VERSION).contains(&version) {
            for (from, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                conn.execute_batch(&format!("BEGIN; {migration} PRAGMA user_version = {}; COMMIT;", from + 1))
                    .map_err(backend)?;
            }
        } else if version != SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "database schema version {version} is not supported (expected {SCHEMA_VERSION})"
            )));
        }
        let last: i64 = conn
            .query_row(
                "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'stream_pos'), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        let committed = Arc::new(AtomicU64::new(last as u64));
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let committed_w = committed.clone();
        let feed: FeedSlot = Arc::new(Mutex::new(None));
        let feed_w = feed.clone();
        thread::Builder::new()
            .name("kabar-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, committed_w, feed_w, last as u64))
            .map_err(backend)?;
        let (read_tx, read_rx) = mpsc::channel::<ReadJob>();
        let read_rx = Arc::new(Mutex::new(read_rx));
        for i in 0..READER_THREADS {
            let conn = open(path, false)?;
            let rx = read_rx.clone();
            thread::Builder::new()
                .name(format!("kabar-sqlite-reader-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&conn),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(backend)?;
        }
        Ok(Self {
            writer: Mutex::new(Some(tx)),
            readers: Mutex::new(Some(read_tx)),
            committed,
            observer,
            feed,
        })
    }

    pub(crate) fn committed(&self) -> StreamPos {
        self.committed.load(Ordering::Acquire)
    }

    pub(crate) fn set_listener(&self, listener: Arc<dyn CommitListener>) {
        if let Ok(mut slot) = self.feed.lock() {
            *slot = Some(listener);
        }
    }

    /// Runs `f` on the writer thread inside the next group commit.
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut Positions) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        self.queue(f).await
    }

    /// Queues `f` for the writer thread before returning (jobs run in the
    /// order they were queued); the future answers once its commit is
    /// durable.
    pub(crate) fn queue<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut Positions) -> StoreResult<R> + Send + 'static,
    ) -> impl Future<Output = StoreResult<R>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn, positions| {
            let result = f(conn, positions);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(commit.and(result));
            });
            (ok, reply)
        });
        let started = std::time::Instant::now();
        let queued = self
            .writer
            .lock()
            .map_err(backend)
            .and_then(|w| w.clone().ok_or_else(|| backend("store is closed")))
            .and_then(|sender| sender.send(job).map_err(|_| backend("writer thread stopped")));
        let observer = self.observer.clone();
        async move {
            queued?;
            let result = rx.await.map_err(|_| backend("writer thread stopped"))?;
            if let Some(o) = &observer {
                o.observe(StoreOp::Write, started.elapsed());
            }
            result
        }
    }

    /// Runs `f` on one of the reader threads.
    pub(crate) async fn read<R: Send + 'static>(&self, f: impl FnOnce(&Connection) -> StoreResult<R> + Send + 'static) -> StoreResult<R> {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        let sender = self
            .readers
            .lock()
            .map_err(backend)?
            .clone()
            .ok_or_else(|| backend("store is closed"))?;
        let started = std::time::Instant::now();
        sender.send(job).map_err(|_| backend("reader threads stopped"))?;
        let result = rx.await.map_err(|_| backend("reader threads stopped"))?;
        if let Some(o) = &self.observer {
            o.observe(StoreOp::Read, started.elapsed());
        }
        result
    }

    /// Stops accepting writes; the writer thread finishes what is queued.
    pub(crate) fn close(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut r) = self.readers.lock() {
            r.take();
        }
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<WriteJob>, committed: Arc<AtomicU64>, feed: FeedSlot, last: StreamPos) {
    let mut positions = Positions {
        next: last + 1,
        updates: vec![],
    };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let batch_start = positions.next;
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE", []) {
            tracing::error!(error = %e, "could not begin write transaction");
            for job in batch {
                let (_, reply) = job(&conn, &mut positions);
                reply(Err(backend(&e)));
            }
            positions.next = batch_start;
            positions.updates.clear();
            continue;
        }
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            let before = positions.next;
            let updates_before = positions.updates.len();
            let savepoint = exec(&conn, "SAVEPOINT job", []);
            let (ok, reply) = job(&conn, &mut positions);
            if savepoint.is_ok() {
                if !ok {
                    let _ = exec(&conn, "ROLLBACK TO job", []);
                }
                let _ = exec(&conn, "RELEASE job", []);
            }
            if !ok {
                positions.next = before;
                positions.updates.truncate(updates_before);
            }
            replies.push(reply);
        }
        let last_assigned = positions.next - 1;
        let commit = exec(
            &conn,
            "INSERT INTO meta (key, value) VALUES ('stream_pos', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [last_assigned as i64],
        )
        .and_then(|_| exec(&conn, "COMMIT", []))
        .map(|_| ());
        match commit {
            Ok(()) => {
                committed.store(last_assigned, Ordering::Release);
                let mut updates = std::mem::take(&mut positions.updates);
                updates.sort_by_key(|u| u.pos);
                // Told before the writers are answered, so that a writer
                // finds its change applied when it gets its answer.
                let listener = feed.lock().ok().and_then(|slot| slot.clone());
                if last_assigned > batch_start - 1
                    && let Some(listener) = listener
                {
                    let batch = CommittedBatch {
                        after: batch_start - 1,
                        head: last_assigned,
                        updates,
                    };
                    // A listener that panics must not take the writer down:
                    // the batch is committed, and the listener can read it
                    // back from the store.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener.committed(&batch))).is_err() {
                        tracing::error!(head = last_assigned, "the commit listener panicked");
                    }
                }
                for reply in replies {
                    reply(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                let _ = exec(&conn, "ROLLBACK", []);
                positions.next = batch_start;
                positions.updates.clear();
                for reply in replies {
                    reply(Err(backend(&e)));
                }
            }
        }
    }
}
