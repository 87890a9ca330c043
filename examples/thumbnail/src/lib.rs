//! Example activity `thumbnail`: decodes a PNG or JPEG input blob, scales it down to fit
//! `max_width` x `max_height` with its aspect ratio kept, and writes the result as a PNG
//! output blob. An image that already fits keeps its size.

use std::io::{Cursor, Write};

use bgw_guest::{Context, Error, Result};
use image::{DynamicImage, ImageFormat};
use serde::{Deserialize, Serialize};

/// Largest accepted `max_width` or `max_height`, in pixels. Bounds the thumbnail's memory.
const MAX_SIDE: u32 = 4096;

#[derive(Deserialize)]
struct Payload {
    #[serde(default = "default_side")]
    max_width: u32,
    #[serde(default = "default_side")]
    max_height: u32,
}

fn default_side() -> u32 {
    128
}

#[derive(Serialize)]
struct Thumbnail {
    source_width: u32,
    source_height: u32,
    width: u32,
    height: u32,
    /// Format of the input blob: "jpeg" or "png".
    format: &'static str,
    /// Size of the PNG output blob in bytes.
    output_bytes: usize,
}

fn thumbnail(ctx: &mut Context, payload: Payload) -> Result<Thumbnail> {
    check_side("max_width", payload.max_width)?;
    check_side("max_height", payload.max_height)?;

    let mut input = ctx.input().ok_or_else(|| {
        Error::invalid_input(
            "thumbnail requires an input blob with a PNG or JPEG image, but the task has none",
        )
    })?;
    let bytes = input.read_to_vec()?;
    let (source, format) = decode(&bytes)?;

    let scaled = scale_to_fit(&source, payload.max_width, payload.max_height);
    let png = encode_png(&scaled)?;

    let mut output = ctx.output();
    output.write_all(&png)?;
    output.flush()?;

    Ok(Thumbnail {
        source_width: source.width(),
        source_height: source.height(),
        width: scaled.width(),
        height: scaled.height(),
        format,
        output_bytes: png.len(),
    })
}

fn check_side(name: &str, value: u32) -> Result<()> {
    if value == 0 || value > MAX_SIDE {
        return Err(Error::invalid_input(format!(
            "{name} must be between 1 and {MAX_SIDE} pixels, got {value}"
        )));
    }
    Ok(())
}

/// Decodes a PNG or JPEG image and returns it with the format's name.
fn decode(bytes: &[u8]) -> Result<(DynamicImage, &'static str)> {
    let (format, name) = match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => (ImageFormat::Png, "png"),
        Ok(ImageFormat::Jpeg) => (ImageFormat::Jpeg, "jpeg"),
        Ok(other) => {
            return Err(Error::invalid_input(format!(
                "input blob is a {other:?} image, but thumbnail accepts only PNG and JPEG"
            )))
        }
        Err(error) => {
            return Err(Error::invalid_input(format!(
                "input blob is not a PNG or JPEG image: {error}"
            )))
        }
    };

    let image = image::load_from_memory_with_format(bytes, format).map_err(|error| {
        Error::invalid_input(format!("failed to decode the {name} input blob: {error}"))
    })?;
    Ok((image, name))
}

/// Scales `image` down to fit the box, keeping its aspect ratio. Never scales up.
fn scale_to_fit(image: &DynamicImage, max_width: u32, max_height: u32) -> DynamicImage {
    if image.width() <= max_width && image.height() <= max_height {
        return image.clone();
    }
    image.thumbnail(max_width, max_height)
}

fn encode_png(image: &DynamicImage) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|error| {
            Error::failed(format!("failed to encode the thumbnail as PNG: {error}"))
        })?;
    Ok(png)
}

bgw_guest::export_activity!(thumbnail);

// Native tests: `cargo test -p thumbnail --target x86_64-unknown-linux-gnu`.
#[cfg(test)]
mod tests {
    use super::*;
    use bgw_guest::ErrorKind;

    fn png_of(width: u32, height: u32) -> Vec<u8> {
        let image = DynamicImage::new_rgb8(width, height);
        encode_png(&image).unwrap()
    }

    #[test]
    fn wide_image_keeps_aspect_ratio() {
        let (image, format) = decode(&png_of(400, 200)).unwrap();
        let scaled = scale_to_fit(&image, 128, 128);
        assert_eq!(format, "png");
        assert_eq!((scaled.width(), scaled.height()), (128, 64));
    }

    #[test]
    fn small_image_is_not_scaled_up() {
        let (image, _) = decode(&png_of(20, 10)).unwrap();
        let scaled = scale_to_fit(&image, 128, 128);
        assert_eq!((scaled.width(), scaled.height()), (20, 10));
    }

    #[test]
    fn garbage_is_invalid_input() {
        let error = decode(b"definitely not an image").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        assert!(error
            .message()
            .starts_with("input blob is not a PNG or JPEG"));
    }

    #[test]
    fn truncated_png_names_decoder_error() {
        let png = png_of(64, 64);
        let error = decode(&png[..60]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        assert!(
            error
                .message()
                .starts_with("failed to decode the png input blob: "),
            "{}",
            error.message()
        );
    }

    #[test]
    fn side_limits_are_checked() {
        assert!(check_side("max_width", 1).is_ok());
        assert!(check_side("max_width", MAX_SIDE).is_ok());
        let zero = check_side("max_width", 0).unwrap_err();
        assert_eq!(
            zero.message(),
            "max_width must be between 1 and 4096 pixels, got 0"
        );
        let too_big = check_side("max_height", MAX_SIDE + 1).unwrap_err();
        assert_eq!(too_big.kind(), ErrorKind::InvalidInput);
    }
}
