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
mod tests {
    use super::*;

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_png_jpeg_and_webp() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 5])));
        for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::WebP] {
            let mut bytes = Vec::new();
            img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
            let back = decode(&bytes, "init image").unwrap();
            assert_eq!(back.dimensions(), (16, 8), "{format:?}");
        }
    }

    #[test]
    fn a_fill_of_a_far_longer_image_crops_before_it_scales() {
        // 8×16384 to 2048²: scaled whole first, it would be 2048×4194304 pixels (26 GB) on the way.
        let thin = DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 16384, |_, y| image::Luma([(y / 64) as u8])));
        let t0 = std::time::Instant::now();
        let out = resize(&thin, 2048, 2048, ResizeMode::Fit, Rgba([0, 0, 0, 0]));
        assert_eq!(out.dimensions(), (2048, 2048));
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t0.elapsed());
        // The centre of the image is kept: rows 8188..8196 of the source, value 127 or 128.
        let middle = out.to_luma8().get_pixel(1024, 1024).0[0];
        assert!((127..=128).contains(&middle), "{middle}");
        // An ordinary shape scales as before (the whole image, then the crop).
        let photo = DynamicImage::ImageRgb8(RgbImage::from_fn(96, 64, |x, y| image::Rgb([x as u8, y as u8, 7])));
        let fit = resize(&photo, 64, 64, ResizeMode::Fit, Rgba([0, 0, 0, 0]));
        assert_eq!(fit.to_rgb8(), photo.resize_to_fill(64, 64, image::imageops::FilterType::Lanczos3).to_rgb8());
        // Wide beyond 4× the target's area: cropped to the target's shape, the middle kept.
        let wide = DynamicImage::ImageRgb8(RgbImage::from_fn(4096, 16, |x, _| image::Rgb([(x / 16) as u8, 0, 0])));
        let out = resize(&wide, 64, 32, ResizeMode::Fit, Rgba([0, 0, 0, 0])).to_rgb8();
        assert_eq!(out.dimensions(), (64, 32));
        let centre = out.get_pixel(32, 16).0[0];
        assert!((126..=129).contains(&centre), "{centre}");
    }

    #[test]
    fn scaling_follows_the_image_crates_rule() {
        // `resize` (Pad) and `resize_to_fill` (Fit) of the `image` crate, for shapes that round either way.
        for (w, h, tw, th) in
            [(100, 50, 64, 64), (97, 61, 40, 48), (33, 200, 64, 32), (640, 480, 512, 512), (7, 3, 96, 64)]
        {
            let img = DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9])));
            let lanczos = image::imageops::FilterType::Lanczos3;
            assert_eq!(scaled_size((w, h), (tw, th), false), img.resize(tw, th, lanczos).dimensions(), "{w}x{h}");
            let fit = resize(&img, tw, th, ResizeMode::Fit, Rgba([0, 0, 0, 0]));
            assert_eq!(fit.to_rgb8(), img.resize_to_fill(tw, th, lanczos).to_rgb8(), "{w}x{h} to {tw}x{th}");
        }
    }

    #[test]
    fn a_thin_image_stretched_tall_stays_within_the_resampling_bound() {
        // Columns first, 16384×8 to 1024×4096 would hold 16384×4096 floats of four channels: 1 GiB.
        let narrow = narrowed_width(16384, 1024, 4096).expect("narrowed");
        assert!(u64::from(narrow) * 4096 * 16 <= MAX_RESAMPLE_BYTES && narrow >= 1024, "{narrow}");
        // Ordinary inputs resample as they come: a 6000-pixel photo to 1024², the widest source to 1024 rows.
        assert_eq!(narrowed_width(6000, 1024, 1024), None);
        assert_eq!(narrowed_width(MAX_SIDE, 1024, 1024), None);
        // Never narrower than the target: a 4096² target from an 8192-wide source narrows to 4096 exactly.
        assert_eq!(narrowed_width(8192, 4096, 4096), Some(4096));
        let t0 = std::time::Instant::now();
        let mask = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(16384, 8, image::Luma([255])));
        let (values, warning) = mask_values(&mask, 1024, 4096, ResizeMode::Stretch, false);
        assert!(warning.is_some() && values.len() == 1024 * 4096);
        assert!(values.iter().all(|&v| v > 0.99), "a white mask stays white");
        let stripes = DynamicImage::ImageRgb8(RgbImage::from_fn(16384, 8, |x, _| image::Rgb([(x / 64) as u8, 0, 0])));
        let out = resize(&stripes, 1024, 4096, ResizeMode::Stretch, Rgba([0, 0, 0, 0])).to_rgb8();
        assert_eq!(out.dimensions(), (1024, 4096));
        // Column 512 of 1024 is the source's 8192: value 128, give or take the filters.
        let middle = out.get_pixel(512, 2048).0[0];
        assert!((126..=130).contains(&middle), "{middle}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "took {:?}", t0.elapsed());
    }

    #[test]
    fn exif_orientation_is_applied() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(16, 8, |x, _| image::Rgb([x as u8 * 15, 0, 0])));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        // An APP1 Exif segment right after SOI: little-endian TIFF, one IFD entry, Orientation (0x0112) = 6
        // ("rotate 90° clockwise to display").
        let tiff: Vec<u8> = [
            &b"II*\0"[..],
            &8u32.to_le_bytes(),
            &1u16.to_le_bytes(),
            &0x0112u16.to_le_bytes(),
            &3u16.to_le_bytes(),
            &1u32.to_le_bytes(),
            &6u16.to_le_bytes(),
            &[0, 0],
            &0u32.to_le_bytes(),
        ]
        .concat();
        let payload = [&b"Exif\0\0"[..], &tiff].concat();
        let mut with_exif = vec![0xFF, 0xD8, 0xFF, 0xE1];
        with_exif.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        with_exif.extend_from_slice(&payload);
        with_exif.extend_from_slice(&jpeg[2..]);
        let decoded = decode(&with_exif, "init image").unwrap();
        assert_eq!(decoded.dimensions(), (8, 16), "a 16x8 picture tagged 'rotate 90' is 8x16 upright");
    }

    #[test]
    fn hostile_inputs_are_clear_errors() {
        assert!(decode(b"", "init image").unwrap_err().to_string().contains("empty"));
        assert!(decode(b"definitely not an image", "mask").unwrap_err().to_string().starts_with("mask:"));
        let good = png(&DynamicImage::ImageRgb8(RgbImage::new(32, 32)));
        let truncated = &good[..good.len() / 2];
        assert!(decode(truncated, "init image").is_err());
        // A PNG header declaring a zero-size image.
        let mut zero = good.clone();
        zero[16..20].copy_from_slice(&0u32.to_be_bytes());
        assert!(decode(&zero, "init image").is_err());
        // A PNG header declaring 100000×100000 pixels: refused before any allocation.
        let mut huge = good.clone();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let err = format!("{:#}", decode(&huge, "init image").unwrap_err());
        assert!(err.contains("init image"), "{err}");
        // 1×100000 is over the side limit; 1×1000 decodes but fits no multiple-of-8 size.
        let err = format!(
            "{:#}",
            decode(&png(&DynamicImage::ImageLuma8(image::GrayImage::new(1, 100_000))), "init image").unwrap_err()
        );
        assert!(err.contains("init image") && err.contains("limit"), "{err}");
        let thin = decode(&png(&DynamicImage::ImageLuma8(image::GrayImage::new(1, 1000))), "init image").unwrap();
        assert!(default_size(&thin).unwrap_err().to_string().contains("at least 8"));
    }

    /// A WebP of a `canvas`-sized VP8X header and a VP8L frame of `frame` pixels (no image data).
    fn webp_with_frame(canvas: (u32, u32), frame: (u32, u32)) -> Vec<u8> {
        let mut vp8x = vec![0u8; 10];
        vp8x[4..7].copy_from_slice(&(canvas.0 - 1).to_le_bytes()[..3]);
        vp8x[7..10].copy_from_slice(&(canvas.1 - 1).to_le_bytes()[..3]);
        let bits = (frame.0 - 1) | ((frame.1 - 1) << 14);
        let mut vp8l = vec![0x2f];
        vp8l.extend_from_slice(&bits.to_le_bytes());
        vp8l.extend_from_slice(&[0; 11]);
        let mut body = b"WEBP".to_vec();
        for (fourcc, data) in [(b"VP8X", vp8x), (b"VP8L", vp8l)] {
            body.extend_from_slice(fourcc);
            body.extend_from_slice(&(data.len() as u32).to_le_bytes());
            body.extend_from_slice(&data);
        }
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn webp_frames_larger_than_their_canvas_are_refused() {
        let bomb = webp_with_frame((16, 16), (16383, 16383));
        let err = format!("{:#}", webp_lossless_bytes(&bomb, 16, 16).unwrap_err());
        assert!(err.contains("16383x16383 frame is larger than the 16x16 canvas"), "{err}");
        assert!(decode(&bomb, "init image").is_err());
        assert_eq!(webp_lossless_bytes(&webp_with_frame((64, 32), (64, 32)), 64, 32).unwrap(), 16);
        assert!(webp_lossless_bytes(b"RIFF\x10\0\0\0WEBPVP8L\xff\0\0\0", 1, 1).is_err(), "a cut chunk");
        // Lossless data is costed by its size (Huffman tables), whatever the pixel count: a 1×1 image with
        // a megabyte of it is refused, a real lossless image of a few hundred KB is not.
        let mut tables = webp_with_frame((1, 1), (1, 1));
        let pad = 1_000_000;
        tables.extend(std::iter::repeat_n(0, pad));
        let vp8l_size = (16 + pad) as u32;
        let at = 12 + 8 + 10 + 4;
        tables[at..at + 4].copy_from_slice(&vp8l_size.to_le_bytes());
        let riff = (tables.len() - 8) as u32;
        tables[4..8].copy_from_slice(&riff.to_le_bytes());
        assert_eq!(webp_lossless_bytes(&tables, 1, 1).unwrap(), 16 + pad as u64);
        let err = format!("{:#}", decode(&tables, "mask").unwrap_err());
        assert!(err.contains("MiB limit"), "{err}");
        let photo = DynamicImage::ImageRgb8(RgbImage::from_fn(256, 256, |x, y| image::Rgb([x as u8, y as u8, 7])));
        let mut lossless = Vec::new();
        photo.write_to(&mut Cursor::new(&mut lossless), image::ImageFormat::WebP).unwrap();
        assert!(lossless.len() < 300_000 && decode(&lossless, "init image").is_ok());
    }

    #[test]
    fn jpeg_costs_follow_the_start_of_frame() {
        let photo = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7])));
        let mut baseline = Vec::new();
        photo.write_to(&mut Cursor::new(&mut baseline), image::ImageFormat::Jpeg).unwrap();
        let (pixels, buffer) = (64 * 48, 64 * 48 * 3);
        assert_eq!(jpeg_cost(&baseline, pixels, buffer), 2 * buffer);
        // The same header marked progressive (SOF2): coefficients of three components besides the pixels.
        let sof = baseline.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        let mut progressive = baseline.clone();
        progressive[sof + 1] = 0xc2;
        assert_eq!(jpeg_cost(&progressive, pixels, buffer), buffer + 6 * pixels);
        assert_eq!(jpeg_cost(&baseline[..sof], pixels, buffer), buffer + 8 * pixels, "no frame: the worst");
        // A 24-megapixel baseline photo fits the budget; a 48-megapixel one does not.
        let photo_cost = |w: u64, h: u64| jpeg_cost(&baseline, w * h, w * h * 3);
        assert!(photo_cost(6000, 4000) < MAX_DECODE_BYTES && photo_cost(8000, 6000) > MAX_DECODE_BYTES);
    }

    #[test]
    fn alpha_is_flattened_on_white_and_sizes_follow_the_mode() {
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(4, 2, Rgba([0, 0, 0, 0])));
        assert_eq!(flatten_rgb(&rgba).get_pixel(0, 0).0, [255, 255, 255]);
        let img = DynamicImage::ImageRgb8(RgbImage::new(100, 50));
        for mode in [ResizeMode::Fit, ResizeMode::Stretch, ResizeMode::Pad] {
            assert_eq!(resize(&img, 64, 64, mode, Rgba([0, 0, 0, 255])).dimensions(), (64, 64), "{mode:?}");
        }
        assert_eq!(default_size(&img).unwrap(), (96, 48));
    }

    #[test]
    fn base64_with_and_without_data_prefix() {
        let bytes = png(&DynamicImage::ImageRgb8(RgbImage::new(8, 8)));
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(decode_base64(&b64, "init image").unwrap(), bytes);
        let url = format!("data:image/png;base64,{}\n", &b64);
        assert_eq!(decode_base64(&url, "init image").unwrap(), bytes);
        assert!(decode_base64("data:image/png,abc", "mask").unwrap_err().to_string().starts_with("mask:"));
        assert!(decode_base64("%%%", "init image").unwrap_err().to_string().contains("base64"));
    }

    #[test]
    fn blurred_masks_soften_edges_only() {
        let mut values = vec![0f32; 16 * 16];
        for y in 4..12 {
            for x in 4..12 {
                values[y * 16 + x] = 1.0;
            }
        }
        assert_eq!(blur_mask(&values, 16, 16, 0.0), values);
        let soft = blur_mask(&values, 16, 16, 1.5);
        assert!(soft[8 * 16 + 8] > 0.9 && soft[0] < 0.01);
        assert!(soft[8 * 16 + 4] > 0.2 && soft[8 * 16 + 4] < 0.8, "edge {}", soft[8 * 16 + 4]);
    }

    #[test]
    fn masks_are_resized_with_a_warning_and_can_be_inverted() {
        let mask = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(8, 8, image::Luma([255])));
        let (v, w) = mask_values(&mask, 8, 8, ResizeMode::Fit, false);
        assert!(w.is_none() && v.iter().all(|&x| x == 1.0));
        let (v, w) = mask_values(&mask, 16, 8, ResizeMode::Fit, true);
        assert!(w.unwrap().contains("resized") && v.len() == 128 && v.iter().all(|&x| x < 0.01));
    }

    #[test]
    fn a_mask_is_brought_to_size_as_its_picture_is() {
        // A picture and its mask, both 96×64, marking the same square: after each resize mode the mask must
        // cover what the picture's square became (a stretched mask drifted off a cropped or padded picture).
        let square = |x: u32, y: u32| (20..44).contains(&x) && (8..32).contains(&y);
        let picture = DynamicImage::ImageLuma8(image::GrayImage::from_fn(96, 64, |x, y| {
            image::Luma([if square(x, y) { 255 } else { 0 }])
        }));
        for mode in [ResizeMode::Fit, ResizeMode::Stretch, ResizeMode::Pad] {
            let sized = resize(&picture, 64, 64, mode, Rgba([0, 0, 0, 255])).to_luma8();
            let (values, warning) = mask_values(&picture, 64, 64, mode, false);
            assert!(warning.is_some());
            let differ =
                sized.as_raw().iter().zip(&values).filter(|(&p, &m)| (p as f32 / 255.0 - m).abs() > 0.1).count();
            assert_eq!(differ, 0, "{mode:?}: {differ} pixels of the mask do not cover the picture's square");
            // Padding is kept, inverted or not.
            if mode == ResizeMode::Pad {
                let (inverted, _) = mask_values(&picture, 64, 64, mode, true);
                assert!(values[0] < 0.01 && inverted[0] < 0.01, "{} {}", values[0], inverted[0]);
            }
        }
    }
}
