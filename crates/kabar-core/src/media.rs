//! Media: uploads stored by content hash (in a directory or in the
//! database, `MediaContent`), metadata in the store, thumbnails made on a
//! bounded pool and cached on this node's disk.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use kabar_store::{
    MediaContent, MediaRecord, Store,
    media_content::{ContentReader, write_once},
};
use rand::{Rng, distributions::Alphanumeric};
use ruma::UserId;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{
    admission::{AddressSlot, AddressSlots},
    error::{Error, Result},
    load::Gate,
    now_ms,
};

/// Largest image side we decode for a thumbnail; bigger images are refused
/// rather than allowed to eat memory.
const MAX_SOURCE_PIXELS: u64 = 40_000_000;

pub struct Media {
    store: Arc<dyn Store>,
    content: Arc<dyn MediaContent>,
    /// Thumbnails made on this node (a cache: any node can make them again).
    thumbnails_dir: PathBuf,
    max_upload_bytes: u64,
    /// Thumbnailing decodes whole images: bounded, and refused once the queue is too long.
    thumbnails: Arc<Gate>,
    /// What the unauthenticated (legacy) paths may serve.
    legacy: LegacyMedia,
    /// Downloads in flight per client address: a file is streamed with a
    /// small buffer, but a client holding thousands of slow downloads would
    /// still hold thousands of files and buffers.
    downloads: Arc<AddressSlots>,
}

/// What the deprecated unauthenticated media paths serve (Matrix 1.11
/// froze them: new media is for signed-in users only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyMedia {
    /// Media created before this moment (ms since the epoch), nothing newer.
    FrozenAt(u64),
    All,
    Off,
}

/// Media to send: opened, with the download slot it holds until the
/// response is sent.
pub struct Download {
    pub record: MediaRecord,
    pub body: ContentReader,
    pub slot: AddressSlot,
}

/// Which path a download came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaPath {
    /// `/_matrix/client/v1/media`: a signed-in user.
    Authenticated,
    /// `/_matrix/media/v3`: anyone, subject to [`LegacyMedia`].
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThumbnailMethod {
    Crop,
    Scale,
}

impl Media {
    pub fn new(
        store: Arc<dyn Store>,
        content: Arc<dyn MediaContent>,
        thumbnails_dir: PathBuf,
        max_upload_bytes: u64,
        thumbnails: Arc<Gate>,
        legacy: LegacyMedia,
        downloads: Arc<AddressSlots>,
    ) -> Result<Self> {
        std::fs::create_dir_all(&thumbnails_dir).map_err(|e| Error::Internal(format!("cannot create the thumbnail directory: {e}")))?;
        Ok(Self {
            store,
            content,
            thumbnails_dir,
            max_upload_bytes,
            thumbnails,
            legacy,
            downloads,
        })
    }

    pub fn max_upload_bytes(&self) -> u64 {
        self.max_upload_bytes
    }

    /// Stores the bytes and returns the new media id.
    pub async fn upload(
        &self,
        uploader: &UserId,
        content_type: Option<String>,
        filename: Option<String>,
        bytes: Vec<u8>,
    ) -> Result<String> {
        if bytes.len() as u64 > self.max_upload_bytes {
            return Err(Error::TooLarge(format!("upload is larger than {} bytes", self.max_upload_bytes)));
        }
        let sha = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        self.content.put_content(&sha, bytes).await?;
        let media_id: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
        self.store
            .put_media(MediaRecord {
                media_id: media_id.clone(),
                content_type: content_type.filter(|c| c.len() <= 255),
                filename: filename.filter(|f| f.len() <= 255),
                sha256: sha,
                size,
                uploader: uploader.to_owned(),
                created_ms: now_ms(),
            })
            .await?;
        Ok(media_id)
    }

    /// The stored record of `media_id`, if `path` may serve it.
    async fn record(&self, media_id: &str, path: MediaPath) -> Result<MediaRecord> {
        let not_found = || Error::NotFound("media not found".into());
        if media_id.is_empty() || media_id.len() > 255 {
            return Err(not_found());
        }
        let record = self.store.media(media_id).await?.ok_or_else(not_found)?;
        let served = match (path, self.legacy) {
            (MediaPath::Authenticated, _) | (MediaPath::Legacy, LegacyMedia::All) => true,
            (MediaPath::Legacy, LegacyMedia::FrozenAt(freeze)) => record.created_ms < freeze,
            (MediaPath::Legacy, LegacyMedia::Off) => false,
        };
        if !served {
            return Err(Error::NotFound(
                "media uploaded since the unauthenticated media freeze is served only on /_matrix/client/v1/media".into(),
            ));
        }
        Ok(record)
    }

    /// Opens a file to stream to `client`, taking one of its download slots.
    pub async fn download(&self, media_id: &str, path: MediaPath, client: IpAddr) -> Result<Download> {
        let slot = self
            .downloads
            .acquire(client)
            .ok_or(Error::LimitExceeded { retry_after_ms: 1000 })?;
        let record = self.record(media_id, path).await?;
        let body = self
            .content
            .content(&record.sha256)
            .await?
            .ok_or_else(|| Error::NotFound("media not found".into()))?;
        Ok(Download { record, body, slot })
    }

    /// A thumbnail no larger than `width` x `height`, as PNG (or JPEG for JPEG sources).
    pub async fn thumbnail(&self, media_id: &str, path: MediaPath, size: (u32, u32), method: ThumbnailMethod) -> Result<(String, Vec<u8>)> {
        let record = self.record(media_id, path).await?;
        let (width, height) = (size.0.clamp(1, 1600), size.1.clamp(1, 1600));
        let key = format!("{}-{width}x{height}-{method:?}", record.sha256);
        let cached = self.thumbnails_dir.join(&key);
        let jpeg = record.content_type.as_deref() == Some("image/jpeg");
        let content_type = if jpeg { "image/jpeg" } else { "image/png" }.to_owned();
        if let Ok(bytes) = tokio::fs::read(&cached).await {
            return Ok((content_type, bytes));
        }
        let _slot = self.thumbnails.enter().await?;
        // Only images are thumbnailed, and only those small enough to decode.
        if record.size > MAX_THUMBNAIL_SOURCE_BYTES {
            return Err(Error::TooLarge("image is too large to thumbnail".into()));
        }
        let mut source = Vec::with_capacity(record.size as usize);
        self.content
            .content(&record.sha256)
            .await?
            .ok_or_else(|| Error::NotFound("media not found".into()))?
            .read_to_end(&mut source)
            .await
            .map_err(|e| Error::Internal(format!("reading media: {e}")))?;
        let bytes = tokio::task::spawn_blocking(move || make_thumbnail(&source, width, height, method, jpeg))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let to_cache = bytes.clone();
        let _ = tokio::task::spawn_blocking(move || write_once(&cached, &to_cache)).await;
        Ok((content_type, bytes))
    }
}

/// Largest file read into memory to make a thumbnail.
const MAX_THUMBNAIL_SOURCE_BYTES: u64 = 20 * 1024 * 1024;

fn make_thumbnail(bytes: &[u8], width: u32, height: u32, method: ThumbnailMethod, jpeg: bool) -> Result<Vec<u8>> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| Error::NotFound("media is not an image".into()))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|_| Error::NotFound("media is not an image this server can thumbnail".into()))?;
    if u64::from(w) * u64::from(h) > MAX_SOURCE_PIXELS {
        return Err(Error::TooLarge("image is too large to thumbnail".into()));
    }
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Internal(e.to_string()))?
        .decode()
        .map_err(|_| Error::NotFound("media is not an image this server can thumbnail".into()))?;
    let thumb = match method {
        ThumbnailMethod::Crop => img.resize_to_fill(width, height, image::imageops::FilterType::Triangle),
        ThumbnailMethod::Scale => img.thumbnail(width, height),
    };
    let mut out = std::io::Cursor::new(Vec::new());
    let format = if jpeg { image::ImageFormat::Jpeg } else { image::ImageFormat::Png };
    let thumb = if jpeg {
        image::DynamicImage::ImageRgb8(thumb.to_rgb8())
    } else {
        thumb
    };
    thumb.write_to(&mut out, format).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(out.into_inner())
}
