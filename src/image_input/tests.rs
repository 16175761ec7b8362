//! Tests of the input images: decoding within bounds, resizing by mode, masks.

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
    for (w, h, tw, th) in [(100, 50, 64, 64), (97, 61, 40, 48), (33, 200, 64, 32), (640, 480, 512, 512), (7, 3, 96, 64)]
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
        let differ = sized.as_raw().iter().zip(&values).filter(|(&p, &m)| (p as f32 / 255.0 - m).abs() > 0.1).count();
        assert_eq!(differ, 0, "{mode:?}: {differ} pixels of the mask do not cover the picture's square");
        // Padding is kept, inverted or not.
        if mode == ResizeMode::Pad {
            let (inverted, _) = mask_values(&picture, 64, 64, mode, true);
            assert!(values[0] < 0.01 && inverted[0] < 0.01, "{} {}", values[0], inverted[0]);
        }
    }
}
