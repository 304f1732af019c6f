//! `kabar migrate`: copies an embedded installation into an empty
//! PostgreSQL database, table by table, with a progress bar, then checks
//! that every table holds as many rows on both sides.
//!
//! The source must not be in use (stop the server first: its admin socket
//! also keeps a second server off the data directory). Media files stay in
//! the data directory, which a server on PostgreSQL keeps using.

use std::path::PathBuf;

use anyhow::{Context, bail};
use kabar_store::copy::TABLES;
use kabar_store_postgres::PostgresStore;
use kabar_store_sqlite::SqliteExport;

/// Rows per chunk: one transaction each on the target.
const CHUNK: usize = 2000;

/// `sqlite:PATH` (a `kabar.db`, or the data directory holding it).
pub fn parse_from(from: &str) -> anyhow::Result<PathBuf> {
    let path = from
        .strip_prefix("sqlite:")
        .context("--from must be sqlite:PATH (the data directory, or its kabar.db)")?;
    let path = PathBuf::from(path);
    Ok(if path.is_dir() { path.join("kabar.db") } else { path })
}

/// `postgres:URL`, or a `postgres://` URL itself.
pub fn parse_to(to: &str) -> anyhow::Result<String> {
    let url = to.strip_prefix("postgres:").filter(|u| u.contains("://")).unwrap_or(to);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!("--to must be postgres:URL, for example postgres:postgres://kabar@127.0.0.1/kabar");
    }
    Ok(url.to_owned())
}

pub async fn run(from: PathBuf, to: String) -> anyhow::Result<()> {
    let source = SqliteExport::open(&from).with_context(|| format!("opening {}", from.display()))?;
    let target = PostgresStore::connect(&to, 4)
        .await
        .map_err(|e| anyhow::anyhow!("cannot use PostgreSQL at {}: {e}", crate::redacted(&to)))?;
    if !target.is_empty().await? {
        bail!("the PostgreSQL database already holds data; migrate into an empty database");
    }
    let mut counts = vec![];
    let mut total = 0;
    for table in TABLES {
        let n = source.count(table)?;
        counts.push((*table, n));
        total += n;
    }
    eprintln!("copying {total} rows in {} tables from {}", TABLES.len(), from.display());
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows ({per_sec}, {eta} left) {msg}").expect("valid template"),
    );
    for (table, _) in &counts {
        bar.set_message(table.to_string());
        let mut after = 0;
        loop {
            let (rows, last) = source.read(table, after, CHUNK)?;
            if rows.rows.is_empty() {
                break;
            }
            target.import(&rows).await.with_context(|| format!("writing {table}"))?;
            bar.inc(rows.rows.len() as u64);
            after = last;
        }
    }
    target.finish_import(&source.server_state()?).await?;
    bar.finish_with_message("done");
    let mut mismatches = vec![];
    for (table, expected) in &counts {
        let copied = target.count(table).await?;
        if copied != *expected {
            mismatches.push(format!("{table}: {expected} in SQLite, {copied} in PostgreSQL"));
        }
    }
    if !mismatches.is_empty() {
        bail!("verification failed:\n{}", mismatches.join("\n"));
    }
    println!(
        "verified: {total} rows in {} tables, the same count in each table on both sides; stream position {}",
        TABLES.len(),
        source.server_state()?.stream_pos
    );
    println!(
        "now set storage.engine = \"postgres\" and storage.postgres.url, and start kabar on the same data directory (media stays there)"
    );
    Ok(())
}
