//! Media bytes in a directory: one file per content hash, written once
//! through a temporary file and a rename, so a crash never leaves a
//! half-written file under its final name. Several nodes share media this
//! way only if they share the directory (a network filesystem).

use std::{
    io::Write,
    path::{Path, PathBuf},
    pin::Pin,
};

use async_trait::async_trait;
use rand::Rng;

use crate::{MediaContent, StoreError, StoreResult};

/// Media bytes to stream to a client.
pub type ContentReader = Pin<Box<dyn tokio::io::AsyncRead + Send + Sync>>;

pub struct DirectoryContent {
    dir: PathBuf,
}

impl DirectoryContent {
    pub fn open(dir: PathBuf) -> StoreResult<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Backend(format!("cannot create media directory {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    fn path_for(&self, sha256: &str) -> StoreResult<PathBuf> {
        if sha256.len() < 3 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Backend(format!("not a content hash: {sha256:?}")));
        }
        Ok(self.dir.join(&sha256[..2]).join(sha256))
    }
}

#[async_trait]
impl MediaContent for DirectoryContent {
    async fn put_content(&self, sha256: &str, bytes: Vec<u8>) -> StoreResult<()> {
        let path = self.path_for(sha256)?;
        tokio::task::spawn_blocking(move || write_once(&path, &bytes))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .map_err(|e| StoreError::Backend(format!("writing media: {e}")))
    }

    async fn content(&self, sha256: &str) -> StoreResult<Option<ContentReader>> {
        match tokio::fs::File::open(self.path_for(sha256)?).await {
            Ok(file) => Ok(Some(Box::pin(file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Backend(format!("reading media: {e}"))),
        }
    }
}

/// Writes `bytes` at `path` unless it exists, via a temporary file and rename.
pub fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = path.parent().ok_or_else(|| std::io::Error::other("a media path has a parent"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", rand::thread_rng().r#gen::<u64>()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_passes_the_media_content_conformance_checks() {
        let dir = tempfile::tempdir().unwrap();
        let content = DirectoryContent::open(dir.path().join("media")).unwrap();
        crate::conformance::media_content(&content).await;
        assert!(
            content.put_content("../../etc", vec![1]).await.is_err(),
            "only content hashes name files"
        );
    }
}
