//! Untrusted input images (init images and masks) made ready for the pipeline: decoded with size limits
//! (a decompression bomb is an error, not an allocation), EXIF orientation applied, alpha flattened on
//! white, and brought to the requested size by one of three resize modes. Shared by the CLI and the
//! worker; the tensor conversions themselves live in `diffusion::image`.

use std::io::Cursor;

use anyhow::{bail, Context, Result};
use image::{DynamicImage, GenericImageView, ImageDecoder, ImageReader, RgbImage, Rgba};

/// Largest encoded input accepted, in bytes.
pub const MAX_ENCODED_BYTES: usize = crate::api::MAX_DECODED_IMAGE_BYTES;
/// Largest decoded input accepted, in pixels (and each side at most [`MAX_SIDE`]).
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;
pub const MAX_SIDE: u32 = 16384;
/// The most memory one decode may take: the decoded buffer (whatever its bit depth) times what its
/// decoder keeps beside it (see [`decode`]), plus a rotated copy when EXIF asks for one.
pub const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;
/// Decodes running at once in one process ([`decode_bounded`]): with [`MAX_DECODE_BYTES`], what hostile
/// inputs can make a queen or worker allocate at a time.
pub const MAX_CONCURRENT_DECODES: usize = 2;

pub use crate::vocab::ResizeMode;

/// Base64 text (optionally a `data:<type>;base64,` URL) decoded; errors name `what`. The contract's rule
/// ([`crate::api::decode_base64`]), shared with the queen's API and the WebAssembly SDK.
pub fn decode_base64(text: &str, what: &str) -> Result<Vec<u8>> {
    crate::api::decode_base64(text, what).map_err(anyhow::Error::msg)
}

/// A soft copy of a mask (`[H·W]` in [0, 1]): Gaussian-blurred with standard deviation `radius` pixels,
/// for compositing with soft edges. `radius` 0 returns the mask unchanged.
pub fn blur_mask(values: &[f32], width: u32, height: u32, radius: f32) -> Vec<f32> {
    if radius <= 0.0 {
        return values.to_vec();
    }
    let img: image::ImageBuffer<image::Luma<f32>, Vec<f32>> =
        image::ImageBuffer::from_raw(width, height, values.to_vec()).expect("mask size matches its values");
    image::imageops::blur(&img, radius).into_raw()
}

/// Decodes `bytes` (PNG, JPEG or WebP, by content) with limits, applying EXIF orientation; `what` names the
/// input in errors (`init image`, `mask`).
pub fn decode(bytes: &[u8], what: &str) -> Result<DynamicImage> {
    if bytes.is_empty() {
        bail!("{what}: the file is empty");
    }
    if bytes.len() > MAX_ENCODED_BYTES {
        bail!("{what}: {} bytes is more than the {} MiB limit", bytes.len(), MAX_ENCODED_BYTES >> 20);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{what}: cannot read the image"))?;
    if reader.format().is_none() {
        bail!("{what}: not a PNG, JPEG or WebP image");
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_PIXELS * 4);
    reader.limits(limits);
    let format = reader.format();
    let mut decoder = reader.into_decoder().with_context(|| format!("{what}: not a readable image"))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        bail!("{what}: the image is {w}x{h}");
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        bail!("{what}: {w}x{h} is more than the {MAX_PIXELS}-pixel limit");
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    // `ImageReader::decode` would reserve the buffer against max_alloc, but it cannot give the orientation;
    // `from_decoder` reserves nothing, so the budget is checked here, for every format and bit depth.
    let buffer = decoder.total_bytes();
    let rotated = if orientation == image::metadata::Orientation::NoTransforms { 0 } else { buffer };
    // What the format's decoder holds at its peak beside the output (the image crate's decoders take no
    // allocation limit of their own): PNG (interlaced or not) decodes into it row by row; a WebP keeps its
    // YUV planes and alpha, an animated one a canvas and a frame.
    let mut cost = match format {
        Some(image::ImageFormat::Png) => buffer,
        Some(image::ImageFormat::Jpeg) => jpeg_cost(bytes, u64::from(w) * u64::from(h), buffer),
        _ => buffer.saturating_mul(4),
    };
    cost = cost.saturating_add(rotated).saturating_add(bytes.len() as u64);
    if format == Some(image::ImageFormat::WebP) {
        let lossless =
            webp_lossless_bytes(bytes, w, h).with_context(|| format!("{what}: not a WebP image we can decode"))?;
        cost = cost.saturating_add(lossless.saturating_mul(LOSSLESS_WEBP_COST));
    }
    if cost > MAX_DECODE_BYTES {
        bail!(
            "{what}: decoding this {w}x{h} {:?} image takes about {} MiB, over the {} MiB limit",
            decoder.color_type(),
            cost >> 20,
            MAX_DECODE_BYTES >> 20
        );
    }
    let mut img = DynamicImage::from_decoder(decoder).with_context(|| format!("{what}: the image data is corrupt"))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// What decoding a JPEG takes: a baseline one decodes row by row into the output (with a second buffer's
/// worth for colour conversion and upsampling); a progressive one keeps every DCT coefficient, 2 bytes per
/// pixel for each component (up to four: CMYK), beside the output. Read from its start-of-frame marker; a
/// JPEG without a readable one is costed as progressive CMYK.
fn jpeg_cost(bytes: &[u8], pixels: u64, buffer: u64) -> u64 {
    let worst = buffer.saturating_add(pixels.saturating_mul(8));
    let mut at = 2;
    while let (Some(&0xff), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) {
        let Some(len) = bytes.get(at + 2..at + 4).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else {
            return worst;
        };
        let start_of_frame = matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
        if start_of_frame {
            let components = bytes.get(at + 9).map_or(4, |&n| u64::from(n.min(4)));
            let progressive = matches!(marker, 0xc2 | 0xc6 | 0xca | 0xce);
            return match progressive {
                true => buffer.saturating_add(pixels.saturating_mul(2 * components)),
                false => buffer.saturating_mul(2),
            };
        }
        at += 2 + len;
    }
    worst
}

/// What a decoder of lossless WebP data (a VP8L image, or a lossless alpha plane) may allocate per byte of
/// it, beside the pixels: each Huffman code group it declares (up to 65,536, whatever the image's size) costs
/// five lookup tables of up to 4 KiB, for some 60 bytes of input at least.
const LOSSLESS_WEBP_COST: u64 = 350;

/// Checks a WebP's layout before it is decoded and returns how many bytes of it are lossless data (see
/// [`LOSSLESS_WEBP_COST`]). Its frames (the still image, or each animation frame) must be no larger than
/// its canvas: a decoder sizes its work by the frame, found only after decoding, while the budget counts
/// the canvas.
fn webp_lossless_bytes(bytes: &[u8], width: u32, height: u32) -> Result<u64> {
    fn le(b: &[u8]) -> u32 {
        b.iter().rev().fold(0, |n, &x| (n << 8) | u32::from(x))
    }
    /// (fourcc, data) of each chunk in `b`.
    fn chunks(mut b: &[u8]) -> Result<Vec<(&[u8], &[u8])>> {
        let mut out = Vec::new();
        while b.len() >= 8 {
            let size = le(&b[4..8]) as usize;
            let data = b.get(8..8 + size).context("a chunk runs past the end of the file")?;
            out.push((&b[..4], data));
            b = b.get(8 + size + (size & 1)..).unwrap_or_default();
        }
        Ok(out)
    }
    /// The size of a VP8 or VP8L bitstream's frame.
    fn frame_size(fourcc: &[u8], data: &[u8]) -> Result<Option<(u32, u32)>> {
        Ok(match fourcc {
            b"VP8 " => {
                let d = data.get(6..10).context("a VP8 frame header is cut short")?;
                Some((le(&d[0..2]) & 0x3fff, le(&d[2..4]) & 0x3fff))
            }
            b"VP8L" => {
                let bits = le(data.get(1..5).context("a VP8L header is cut short")?);
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            _ => None,
        })
    }
    let body = bytes.get(12..).context("no RIFF body")?;
    let mut top = chunks(body)?;
    let mut all = Vec::new();
    while let Some((fourcc, data)) = top.pop() {
        if fourcc == b"ANMF" {
            top.extend(chunks(data.get(16..).unwrap_or_default())?);
        } else {
            all.push((fourcc, data));
        }
    }
    let mut lossless = 0;
    for (fourcc, data) in all {
        if let Some((fw, fh)) = frame_size(fourcc, data)? {
            if fw > width || fh > height {
                bail!("a {fw}x{fh} frame is larger than the {width}x{height} canvas");
            }
        }
        if fourcc == b"VP8L" || fourcc == b"ALPH" {
            lossless += data.len() as u64;
        }
    }
    Ok(lossless)
}

/// [`decode`] on a blocking thread, at most [`MAX_CONCURRENT_DECODES`] at a time in the process: what the
/// queen and the workers use for images from the network.
pub async fn decode_bounded(bytes: bytes::Bytes, what: &str) -> Result<DynamicImage> {
    decode_bounded_then(bytes, what, Ok).await
}

/// [`decode_bounded`], then `then` on the decoded image on the same thread, in the same slot: work on an
/// image as large as the limits allow stays off the async threads and within the decodes' bound.
pub async fn decode_bounded_then<T: Send + 'static>(
    bytes: bytes::Bytes,
    what: &str,
    then: impl FnOnce(DynamicImage) -> Result<T> + Send + 'static,
) -> Result<T> {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_DECODES);
    // Waiting callers hold their request bodies: past a while, say so rather than pile up.
    let slot = match tokio::time::timeout(DECODE_WAIT, SLOTS.acquire()).await {
        Ok(slot) => slot.expect("the decode semaphore is never closed"),
        Err(_) => return Err(DecodeBusy.into()),
    };
    let what_owned = what.to_string();
    // The slot goes with the thread: a caller that gives up (a client that hangs up) does not free it
    // while the decode still runs.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        then(decode(&bytes, &what_owned)?)
    })
    .await
    .with_context(|| format!("{what}: the decoding thread failed"))?
}

/// How long [`decode_bounded`] waits for a free decoding slot.
pub const DECODE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Every decoding slot stayed busy for [`DECODE_WAIT`]: try again later (not the image's fault).
#[derive(Debug, thiserror::Error)]
#[error("too many images are being decoded at once; try again shortly")]
pub struct DecodeBusy;

/// RGB with any alpha flattened onto white.
pub fn flatten_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let Rgba([r, g, b, a]) = *rgba.get_pixel(x, y);
        let blend = |c: u8| ((c as u32 * a as u32 + 255 * (255 - a as u32) + 127) / 255) as u8;
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

/// `img` at exactly `width`×`height` (Lanczos resampling, as diffusers' image processor).
pub fn resize(img: &DynamicImage, width: u32, height: u32, mode: ResizeMode, fill: Rgba<u8>) -> DynamicImage {
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) {
        return img.clone();
    }
    match mode {
        ResizeMode::Stretch => resample(img, width, height),
        ResizeMode::Fit => cover(img, width, height),
        ResizeMode::Pad => {
            let (iw, ih) = scaled_size((w, h), (width, height), false);
            let inner = resample(img, iw, ih);
            let mut canvas = image::RgbaImage::from_pixel(width, height, fill);
            let (x, y) = ((width - inner.width()) / 2, (height - inner.height()) / 2);
            image::imageops::overlay(&mut canvas, &inner.to_rgba8(), x as i64, y as i64);
            DynamicImage::ImageRgba8(canvas)
        }
    }
}

/// Scaled to cover `width`×`height`, centre-cropped to it (as `DynamicImage::resize_to_fill`). Scaling the whole
/// image first, an image far longer than the target (8×16384 to 2048², a 369-byte PNG) would become 2048×4194304
/// pixels, 26 GB, on the way. Past 4× the target's area, the image is cropped to the target's shape first
/// (the pixels along the cut then differ slightly, as the filter no longer sees beyond it).
fn cover(img: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    let (w, h) = (u64::from(img.width()), u64::from(img.height()));
    let (tw, th) = (u64::from(width), u64::from(height));
    // The covering scale is max(tw/w, th/h): the intermediate is w·s × h·s.
    let covering_area = if tw * h >= th * w { tw * tw * h / w.max(1) } else { th * th * w / h.max(1) };
    if covering_area <= 4 * tw * th {
        let (sw, sh) = scaled_size((img.width(), img.height()), (width, height), true);
        let scaled = resample(img, sw, sh);
        return if u64::from(width) * u64::from(sh) > u64::from(sw) * u64::from(height) {
            scaled.crop_imm(0, (sh - height) / 2, width, height)
        } else {
            scaled.crop_imm((sw - width) / 2, 0, width, height)
        };
    }
    // The largest centred region of the target's shape, in the image's own pixels.
    let (cw, ch) = if tw * h >= th * w { (w, (w * th / tw).max(1)) } else { ((h * tw / th).max(1), h) };
    let cropped = img.crop_imm(((w - cw) / 2) as u32, ((h - ch) / 2) as u32, cw as u32, ch as u32);
    resample(&cropped, width, height)
}

/// `(w, h)` scaled by one factor to fit inside `target` (or, with `fill`, to cover it), each side rounded and
/// at least 1: the `image` crate's rule for `resize` and `resize_to_fill`, so that [`resample`] can do their
/// scaling.
fn scaled_size((w, h): (u32, u32), (tw, th): (u32, u32), fill: bool) -> (u32, u32) {
    let (wr, hr) = (f64::from(tw) / f64::from(w.max(1)), f64::from(th) / f64::from(h.max(1)));
    let ratio = if fill { wr.max(hr) } else { wr.min(hr) };
    let side = |v: u32| (f64::from(v) * ratio).round().clamp(1.0, f64::from(u32::MAX)) as u32;
    (side(w), side(h))
}

/// The most memory one resampling takes beside its input and output, unless its own output's size in floats
/// (16 bytes a pixel) is more. The `image` crate resamples the columns first, into floats of the source's width
/// by the target's height: a thin mask stretched to a tall image (16384×8 to 1024×4096, a few hundred bytes of
/// PNG) would take 1 GiB there, and the CPU time to fill it, for every job that carried it and on every worker
/// it was retried on.
const MAX_RESAMPLE_BYTES: u64 = MAX_DECODE_BYTES;

/// How wide the source may be for resampling to `height` rows within [`MAX_RESAMPLE_BYTES`] (never less than
/// the target's `width`); `None` when `source_width` is within it.
fn narrowed_width(source_width: u32, width: u32, height: u32) -> Option<u32> {
    let widest = (MAX_RESAMPLE_BYTES / (16 * u64::from(height.max(1)))).max(u64::from(width));
    (u64::from(source_width) > widest).then_some(widest as u32)
}

/// `img` at exactly `width`×`height`, Lanczos-resampled. A source too wide for [`MAX_RESAMPLE_BYTES`] is first
/// narrowed with a box filter (`thumbnail`, which needs no buffer beyond its output) to the widest that fits:
/// only sources far wider than their target, on targets of 2048 rows and more, take that step.
fn resample(img: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    let filter = image::imageops::FilterType::Lanczos3;
    match narrowed_width(img.width(), width, height) {
        Some(narrow) => img.thumbnail_exact(narrow, img.height()).resize_exact(width, height, filter),
        None => img.resize_exact(width, height, filter),
    }
}

/// The size to use when the request gives none: the image's own, rounded down to a multiple of 8.
pub fn default_size(img: &DynamicImage) -> Result<(u32, u32)> {
    let (w, h) = img.dimensions();
    let (w8, h8) = (w / 8 * 8, h / 8 * 8);
    if w8 == 0 || h8 == 0 {
        bail!("the image is {w}x{h}: each side must be at least 8 pixels");
    }
    Ok((w8, h8))
}

/// A mask as `[H·W]` values in [0, 1] (white = repaint), at `width`×`height`; `invert` swaps the regions.
/// A mask of another size is brought to size as its init image is, by `mode` (so the two stay aligned when
/// the picture is cropped or padded), with a warning returned; padding is the region kept, and a colour mask
/// is read as luminance.
pub fn mask_values(
    img: &DynamicImage,
    width: u32,
    height: u32,
    mode: ResizeMode,
    invert: bool,
) -> (Vec<f32>, Option<String>) {
    let mut warning = None;
    let img = if img.dimensions() != (width, height) {
        let (w, h) = img.dimensions();
        warning = Some(format!("the mask is {w}x{h}; resized to {width}x{height}"));
        let keep = if invert { Rgba([255, 255, 255, 255]) } else { Rgba([0, 0, 0, 255]) };
        resize(&DynamicImage::ImageLuma8(img.to_luma8()), width, height, mode, keep)
    } else {
        img.clone()
    };
    let luma = img.to_luma8();
    let values = luma.as_raw().iter().map(|&v| v as f32 / 255.0).map(|v| if invert { 1.0 - v } else { v }).collect();
    (values, warning)
}

#[cfg(test)]
mod tests;
