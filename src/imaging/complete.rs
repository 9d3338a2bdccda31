//! Is an encoded image all there? Decoders fill the rows of a cut stream with grey
//! and report success; a network-cut upload must be refused, never diagnosed. These
//! walks follow the container's own structure to its end marker, in one pass over
//! the bytes, without decoding a pixel.

crate::message_error!(
    /// Why an encoded image is not all there (cut, or not the container it claims to be).
    IncompleteImage
);

/// A JPEG reaches its EOI marker: segments are skipped by their lengths (embedded
/// thumbnails live inside APPn segments and cannot end the walk), entropy-coded data
/// after each SOS is scanned for the next marker (stuffed `FF 00`, restart markers and
/// fill bytes are data). Bytes after EOI are ignored.
pub fn jpeg(b: &[u8]) -> Result<(), IncompleteImage> {
    let cut = |what: &str| format!("the JPEG data ends {what} (truncated upload?)");
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err(IncompleteImage("no JPEG start-of-image marker".into()));
    }
    let mut pos = 2;
    loop {
        if pos >= b.len() {
            return Err(IncompleteImage(cut("before its end-of-image marker")));
        }
        if b[pos] != 0xFF {
            return Err(IncompleteImage(format!(
                "expected a JPEG marker at byte {pos}"
            )));
        }
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = b.get(pos) else {
            return Err(IncompleteImage(cut("inside a marker")));
        };
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            0x00 | 0xD8 => {
                return Err(IncompleteImage(format!(
                    "unexpected JPEG marker {marker:02X} at byte {}",
                    pos - 2
                )));
            }
            _ => {}
        }
        if pos + 2 > b.len() {
            return Err(IncompleteImage(cut("inside a segment header")));
        }
        let len = usize::from(u16::from_be_bytes([b[pos], b[pos + 1]]));
        if len < 2 {
            return Err(IncompleteImage(format!(
                "JPEG segment at byte {} has length {len}",
                pos - 2
            )));
        }
        if pos + len > b.len() {
            return Err(IncompleteImage(cut("inside a segment")));
        }
        pos += len;
        if marker == 0xDA {
            // Entropy-coded data up to the next real marker.
            loop {
                match b[pos..].iter().position(|&v| v == 0xFF) {
                    None => return Err(IncompleteImage(cut("inside the compressed image data"))),
                    Some(i) => pos += i,
                }
                let Some(&next) = b.get(pos + 1) else {
                    return Err(IncompleteImage(cut("inside the compressed image data")));
                };
                match next {
                    0x00 | 0xD0..=0xD7 => pos += 2,
                    0xFF => pos += 1,
                    _ => break,
                }
            }
        }
    }
}

/// A PNG's chunks are all there, up to IEND (each chunk's declared length fits in
/// what follows it). A stream cut inside or after the image data lacks IEND; the
/// decoder checks the chunks' CRCs and that the image data inflates to every row.
pub fn png(b: &[u8]) -> Result<(), IncompleteImage> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if !b.starts_with(&SIGNATURE) {
        return Err(IncompleteImage("no PNG signature".into()));
    }
    let mut pos = SIGNATURE.len();
    loop {
        if pos + 8 > b.len() {
            return Err(IncompleteImage(
                "the PNG data ends before its IEND chunk (truncated upload?)".into(),
            ));
        }
        let len = u32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]) as usize;
        let kind = &b[pos + 4..pos + 8];
        if len > (1 << 31) - 1 || pos + 12 + len > b.len() {
            return Err(IncompleteImage(format!(
                "the PNG data ends inside its {} chunk (truncated upload?)",
                String::from_utf8_lossy(kind)
            )));
        }
        if kind == b"IEND" {
            return Ok(());
        }
        pos += 12 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageFormat};
    use std::io::Cursor;

    fn encode(fmt: ImageFormat) -> Vec<u8> {
        let img = GrayImage::from_fn(96, 80, |x, y| image::Luma([((x * 7) ^ (y * 5)) as u8]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), fmt).unwrap();
        out
    }

    #[test]
    fn whole_images_pass_and_every_cut_fails() {
        for (fmt, check) in [
            (
                ImageFormat::Jpeg,
                jpeg as fn(&[u8]) -> Result<(), IncompleteImage>,
            ),
            (ImageFormat::Png, png),
        ] {
            let b = encode(fmt);
            assert_eq!(check(&b), Ok(()), "{fmt:?}");
            // Trailing bytes after the end marker are not a cut.
            let mut padded = b.clone();
            padded.extend_from_slice(&[0, 0, 0]);
            assert_eq!(check(&padded), Ok(()), "{fmt:?} padded");
            for cut in 0..b.len() {
                assert!(
                    check(&b[..cut]).is_err(),
                    "{fmt:?} cut at {cut} of {}",
                    b.len()
                );
            }
        }
    }

    #[test]
    fn jpeg_scan_data_escapes_are_data() {
        // SOI, SOS (length 2), data with FF00, RST0 and fill FF FF, then EOI.
        let b = [
            0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF,
            0xFF, 0xD9,
        ];
        assert_eq!(jpeg(&b), Ok(()));
        assert!(jpeg(&b[..b.len() - 1]).is_err());
    }
}
