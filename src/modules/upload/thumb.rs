//! Image previews for the upload service (`GET …?thumb=256`).
//!
//! Uploaded files are untrusted input, so decoding is bounded three ways:
//! the encoded bytes ([`MAX_INPUT`], the caller reads no more than that),
//! the decoded pixels and allocations ([`Limits`], checked from the header
//! before any pixel buffer exists, so a decompression bomb is refused
//! without allocating), and wall time plus concurrency ([`Thumbnailer`]).
//!
//! Only files uploaded with an image content type are previewed; OMEMO
//! media (`aesgcm://` links) is uploaded as ciphertext, typically as
//! `application/octet-stream`, and stays opaque: even when a client labels
//! ciphertext `image/jpeg`, the bytes sniff as no image and get a 415.
//!
//! Previews are always JPEG ([`CONTENT_TYPE`]): the image crate's WebP
//! encoder is lossless only, which makes previews larger, not smaller.

use axum::http::StatusCode;
use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The long-side sizes a client may ask for. A fixed list, so that a client
/// cannot make the server compute and cache an unbounded set of variants.
pub const SIZES: &[u32] = &[64, 128, 256, 512];

/// The most encoded bytes worth decoding for a preview: the caller reads at
/// most this much of a blob and answers 413 ("too large to preview") for a
/// bigger one ([`ThumbError::TooLarge`]). A 40-megapixel phone JPEG is well
/// under it.
pub const MAX_INPUT: u64 = 32 << 20;

/// The content type of every preview [`make`] returns.
pub const CONTENT_TYPE: &str = "image/jpeg";

/// JPEG quality of previews: small files that still look like the photo.
const QUALITY: u8 = 80;

/// Bounds on decoding one image.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Width times height; above it the image is refused from its header.
    pub max_pixels: u64,
    /// Either side, so a 1×40M strip is refused too (decoders pad rows).
    pub max_side: u32,
    /// Bytes the decoder may allocate at once, output buffer included.
    pub max_alloc: u64,
    /// Wall time for one preview, queueing for a worker included.
    pub timeout: Duration,
    /// Previews decoded at once; further requests wait (within `timeout`).
    pub concurrent: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 40_000_000,
            max_side: 20_000,
            max_alloc: 256 << 20,
            timeout: Duration::from_secs(5),
            concurrent: 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ThumbError {
    #[error("thumbnail size {0} is not one of {SIZES:?}")]
    BadSize(u32),
    /// The upload's content type is not one previews are made for (SVG,
    /// video, octet-stream and so encrypted media).
    #[error("no previews for this type of file")]
    Unsupported,
    /// The bytes are no image of a format decoded here.
    #[error("the file is not an image")]
    NotAnImage,
    /// The header was read but the image data is broken or truncated.
    #[error("the image is damaged")]
    Damaged,
    /// More than [`MAX_INPUT`] encoded bytes.
    #[error("the file is too large to preview")]
    TooLarge,
    /// Declared dimensions or decoder allocations over [`Limits`]: what a
    /// decompression bomb looks like.
    #[error("the image has too many pixels to preview")]
    TooManyPixels,
    /// Over the time limit, or too many previews in progress.
    #[error("the preview took too long")]
    Timeout,
    #[error("the preview could not be made: {0}")]
    Internal(String),
}

impl ThumbError {
    /// The HTTP status and a short body a client can show.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ThumbError::BadSize(_) => (
                StatusCode::BAD_REQUEST,
                "thumbnail size must be 64, 128, 256 or 512",
            ),
            ThumbError::Unsupported => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "no previews for this type of file",
            ),
            ThumbError::NotAnImage => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the file is not an image",
            ),
            ThumbError::Damaged => (StatusCode::UNPROCESSABLE_ENTITY, "the image is damaged"),
            ThumbError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too large to preview"),
            ThumbError::TooManyPixels => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "the image has too many pixels to preview",
            ),
            ThumbError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "the preview took too long"),
            ThumbError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the preview could not be made",
            ),
        }
    }
}

/// Whether previews are made for uploads of this content type (parameters
/// and case ignored). SVG is left out on purpose: it is a document that can
/// carry scripts and references, not pixels.
pub fn thumbnailable(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    [
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/gif",
        "image/webp",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t))
}

/// Where the preview of blob `sha256` at `size` is cached in blob storage.
/// `sha256` is the store's lowercase hex digest, so the key is path-safe.
pub fn cache_key(sha256: &str, size: u32) -> String {
    debug_assert!(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()));
    format!("thumbs/{sha256}-{size}.jpg")
}

/// The checks that cost nothing, done before a worker is taken.
fn check_request(len: usize, content_type: &str, size: u32) -> Result<(), ThumbError> {
    if !SIZES.contains(&size) {
        return Err(ThumbError::BadSize(size));
    }
    if !thumbnailable(content_type) {
        return Err(ThumbError::Unsupported);
    }
    if len as u64 > MAX_INPUT {
        return Err(ThumbError::TooLarge);
    }
    Ok(())
}

/// A JPEG of `bytes` scaled to `size` on its long side (never up), aspect
/// ratio kept, EXIF orientation applied, transparency on white.
///
/// CPU-bound for up to a second or so on a large photo: call it through
/// [`Thumbnailer::make_bounded`] (or `spawn_blocking` under a timeout),
/// never on an async worker thread.
pub fn make(
    bytes: &[u8],
    content_type: &str,
    size: u32,
    limits: &Limits,
) -> Result<Vec<u8>, ThumbError> {
    check_request(bytes.len(), content_type, size)?;
    // The content type only says "some image"; the bytes say which decoder.
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ThumbError::Internal(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP) => {}
        _ => return Err(ThumbError::NotAnImage),
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_alloc);
    reader.limits(decoder_limits);
    // Only the header is read here; no pixel buffer exists yet.
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > limits.max_pixels
        || decoder.total_bytes() > limits.max_alloc
    {
        return Err(ThumbError::TooManyPixels);
    }
    // A broken EXIF block only costs the rotation, not the preview.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        ImageError::Limits(_) => ThumbError::TooManyPixels,
        _ => ThumbError::Damaged,
    })?;
    if img.width().max(img.height()) > size {
        img = img.thumbnail(size, size);
    }
    img.apply_orientation(orientation);
    encode(&img)
}

/// Errors reading the header: a refused limit, or bytes that only looked
/// like an image.
fn decode_error(e: ImageError) -> ThumbError {
    match e {
        ImageError::Limits(_) => ThumbError::TooManyPixels,
        _ => ThumbError::NotAnImage,
    }
}

fn encode(img: &DynamicImage) -> Result<Vec<u8>, ThumbError> {
    // JPEG has no alpha: transparent areas become white, as chat apps show
    // them, rather than whatever colour the transparent pixels carry.
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = image::RgbImage::new(w, h);
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = u16::from(px[3]);
        for c in 0..3 {
            out[c] = ((u16::from(px[c]) * a + 255 * (255 - a)) / 255) as u8;
        }
    }
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, QUALITY)
        .encode_image(&rgb)
        .map_err(|e| ThumbError::Internal(e.to_string()))?;
    Ok(out)
}

/// Runs [`make`] off the async threads, bounded in time and in how many run
/// at once. One per upload service; cheap to share by reference.
pub struct Thumbnailer {
    limits: Limits,
    workers: Arc<Semaphore>,
}

impl Thumbnailer {
    pub fn new(limits: Limits) -> Self {
        let workers = Arc::new(Semaphore::new(limits.concurrent.max(1)));
        Thumbnailer { limits, workers }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// [`make`] on a blocking thread, within `limits.timeout` including the
    /// wait for a worker. A timed-out decode cannot be interrupted; it keeps
    /// its worker until it ends, so abandoned decodes still count against
    /// `limits.concurrent` and a flood of slow images gets 503s, not threads.
    pub async fn make_bounded(
        &self,
        bytes: Vec<u8>,
        content_type: &str,
        size: u32,
    ) -> Result<Vec<u8>, ThumbError> {
        check_request(bytes.len(), content_type, size)?;
        let limits = self.limits.clone();
        let content_type = content_type.to_owned();
        let work = async {
            let permit = Arc::clone(&self.workers)
                .acquire_owned()
                .await
                .map_err(|_| ThumbError::Internal("thumbnailer closed".into()))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                make(&bytes, &content_type, size, &limits)
            })
            .await
            .map_err(|e| ThumbError::Internal(e.to_string()))?
        };
        tokio::time::timeout(self.limits.timeout, work)
            .await
            .map_err(|_| ThumbError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};
    use std::time::Instant;

    /// A 300×150 gradient, so a scaled preview is not trivially uniform.
    fn photo() -> RgbImage {
        RgbImage::from_fn(300, 150, |x, y| {
            Rgb([(x * 255 / 299) as u8, (y * 255 / 149) as u8, 128])
        })
    }

    fn png_of(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg_of(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .unwrap();
        out
    }

    /// Decodes a preview as a JPEG (not by sniffing: it must be one).
    fn decode_jpeg(bytes: &[u8]) -> DynamicImage {
        image::load_from_memory_with_format(bytes, ImageFormat::Jpeg)
            .expect("the preview is a JPEG")
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// A valid PNG header declaring `width`×`height` pixels of `color_type`
    /// at `depth` bits, with a few bytes of image data: the shape of a
    /// decompression bomb, whose real data would inflate to gigabytes.
    fn declared_png(width: u32, height: u32, depth: u8, color_type: u8) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[depth, color_type, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        // zlib stream of a few zero bytes: starts like endless zeros.
        chunk(
            &mut out,
            b"IDAT",
            &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }

    fn assert_refused_fast(bytes: &[u8]) {
        let start = Instant::now();
        assert_eq!(
            make(bytes, "image/png", 256, &Limits::default()),
            Err(ThumbError::TooManyPixels)
        );
        // Refused from the header: allocating and filling the pixels would
        // take seconds (and gigabytes).
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn png_and_jpeg_are_scaled_to_the_long_side_keeping_aspect() {
        let png = png_of(&DynamicImage::ImageRgb8(photo()));
        let jpeg = jpeg_of(&photo());
        for (bytes, ct) in [(&png, "image/png"), (&jpeg, "image/jpeg; charset=binary")] {
            for &size in SIZES {
                let out = make(bytes, ct, size, &Limits::default()).unwrap();
                let thumb = decode_jpeg(&out);
                let want = if size >= 300 {
                    (300, 150)
                } else {
                    (size, size / 2)
                };
                assert_eq!(thumb.dimensions(), want, "{ct} at {size}");
            }
        }
        // The picture survives: the gradient's corners keep their colours.
        let thumb =
            decode_jpeg(&make(&png, "image/png", 128, &Limits::default()).unwrap()).to_rgb8();
        let dark = thumb.get_pixel(1, 1);
        let bright = thumb.get_pixel(126, 62);
        assert!(dark[0] < 40 && bright[0] > 200, "{dark:?} {bright:?}");
    }

    #[test]
    fn transparency_becomes_white() {
        let clear = RgbaImage::from_pixel(100, 100, Rgba([0, 0, 0, 0]));
        let out = make(
            &png_of(&DynamicImage::ImageRgba8(clear)),
            "image/png",
            64,
            &Limits::default(),
        )
        .unwrap();
        let px = *decode_jpeg(&out).to_rgb8().get_pixel(32, 32);
        assert!(px.0.iter().all(|&c| c > 245), "{px:?}");
    }

    #[test]
    fn gif_and_webp_are_read() {
        let small =
            DynamicImage::ImageRgba8(RgbaImage::from_pixel(40, 20, Rgba([200, 10, 10, 255])));
        let mut gif = Cursor::new(Vec::new());
        small.write_to(&mut gif, ImageFormat::Gif).unwrap();
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(small.as_bytes(), 40, 20, image::ExtendedColorType::Rgba8)
            .unwrap();
        for (bytes, ct) in [(gif.into_inner(), "image/gif"), (webp, "image/webp")] {
            let thumb = decode_jpeg(&make(&bytes, ct, 64, &Limits::default()).unwrap());
            // Smaller than the size asked for: kept, not enlarged.
            assert_eq!(thumb.dimensions(), (40, 20), "{ct}");
        }
    }

    #[test]
    fn exif_orientation_is_applied() {
        // APP1 Exif, big-endian TIFF, one IFD entry: Orientation (0x0112) = 6,
        // "rotate 90° clockwise", as phones write portrait photos.
        let mut app1 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        app1.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        let jpeg = jpeg_of(&photo());
        let mut tagged = jpeg[..2].to_vec();
        tagged.extend_from_slice(&[0xff, 0xe1]);
        tagged.extend_from_slice(&(app1.len() as u16 + 2).to_be_bytes());
        tagged.extend_from_slice(&app1);
        tagged.extend_from_slice(&jpeg[2..]);
        let thumb = decode_jpeg(&make(&tagged, "image/jpeg", 128, &Limits::default()).unwrap());
        assert_eq!(thumb.dimensions(), (64, 128));
    }

    #[test]
    fn decompression_bombs_are_refused_from_the_header() {
        // 3.6 gigapixels declared in a 67-byte file.
        let bomb = declared_png(60_000, 60_000, 8, 2);
        assert!(bomb.len() < 100);
        assert_refused_fast(&bomb);
        // Under the pixel cap but 16-bit RGBA: 288 MiB of pixels.
        assert_refused_fast(&declared_png(6_000, 6_000, 16, 6));
        // A strip: few pixels, absurd width.
        assert_refused_fast(&declared_png(1_000_000, 1, 8, 0));
        // The cap is the caller's to set.
        let tight = Limits {
            max_pixels: 100 * 100,
            ..Limits::default()
        };
        let png = png_of(&DynamicImage::ImageRgb8(photo()));
        assert_eq!(
            make(&png, "image/png", 64, &tight),
            Err(ThumbError::TooManyPixels)
        );
        assert_eq!(
            ThumbError::TooManyPixels.status().0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[test]
    fn bad_requests_and_bad_bytes_are_refused() {
        let png = png_of(&DynamicImage::ImageRgb8(photo()));
        let l = Limits::default();
        assert_eq!(
            make(&png, "image/png", 100, &l),
            Err(ThumbError::BadSize(100))
        );
        assert_eq!(make(&png, "image/png", 0, &l), Err(ThumbError::BadSize(0)));
        for ct in [
            "image/svg+xml",
            "application/octet-stream",
            "video/mp4",
            "text/plain",
            "",
        ] {
            assert_eq!(make(&png, ct, 64, &l), Err(ThumbError::Unsupported), "{ct}");
        }
        // Ciphertext labelled as a photo (what an OMEMO client may upload).
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(
            make(&noise, "image/jpeg", 64, &l),
            Err(ThumbError::NotAnImage)
        );
        assert_eq!(make(b"", "image/png", 64, &l), Err(ThumbError::NotAnImage));
        // Another format's bytes: sniffed, and not one decoded here.
        assert_eq!(
            make(b"BM\0\0\0\0\0\0\0\0\x36\0\0\0", "image/png", 64, &l),
            Err(ThumbError::NotAnImage)
        );
        // A real PNG cut in half: the header reads, the pixels don't.
        assert_eq!(
            make(&png[..png.len() / 2], "image/png", 64, &l),
            Err(ThumbError::Damaged)
        );
        // Over the input cap, refused before looking at the bytes.
        let huge = vec![0u8; MAX_INPUT as usize + 1];
        assert_eq!(make(&huge, "image/png", 64, &l), Err(ThumbError::TooLarge));

        let statuses: Vec<u16> = [
            ThumbError::BadSize(100),
            ThumbError::Unsupported,
            ThumbError::NotAnImage,
            ThumbError::Damaged,
            ThumbError::TooLarge,
            ThumbError::Timeout,
        ]
        .iter()
        .map(|e| e.status().0.as_u16())
        .collect();
        assert_eq!(statuses, [400, 415, 415, 422, 413, 503]);
    }

    #[test]
    fn thumbnailable_types() {
        for ct in [
            "image/png",
            "IMAGE/JPEG",
            "image/jpeg; q=1",
            "image/gif",
            "image/webp",
        ] {
            assert!(thumbnailable(ct), "{ct}");
        }
        for ct in [
            "image/svg+xml",
            "image/heic",
            "image/pngx",
            "application/octet-stream",
        ] {
            assert!(!thumbnailable(ct), "{ct}");
        }
    }

    #[test]
    fn cache_keys_name_blob_and_size() {
        let sha = "ab".repeat(32);
        assert_eq!(cache_key(&sha, 256), format!("thumbs/{sha}-256.jpg"));
        assert_ne!(cache_key(&sha, 64), cache_key(&sha, 128));
    }

    #[tokio::test]
    async fn bounded_runs_off_thread_and_times_out_when_busy() {
        let png = png_of(&DynamicImage::ImageRgb8(photo()));
        let t = Thumbnailer::new(Limits {
            timeout: Duration::from_millis(300),
            concurrent: 1,
            ..Limits::default()
        });
        let out = t.make_bounded(png.clone(), "image/png", 64).await.unwrap();
        assert_eq!(decode_jpeg(&out).dimensions(), (64, 32));
        // Cheap refusals need no worker.
        assert_eq!(
            t.make_bounded(png.clone(), "image/png", 65).await,
            Err(ThumbError::BadSize(65))
        );
        // The only worker busy (as with an abandoned slow decode): 503.
        let busy = Arc::clone(&t.workers).acquire_owned().await.unwrap();
        let start = Instant::now();
        assert_eq!(
            t.make_bounded(png.clone(), "image/png", 64).await,
            Err(ThumbError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(300));
        drop(busy);
        assert!(t.make_bounded(png, "image/png", 64).await.is_ok());
    }
}
