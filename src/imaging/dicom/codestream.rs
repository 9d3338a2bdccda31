//! A compressed frame's own header, checked before a decoder reads it: JPEG SOF and
//! JPEG 2000 SIZ dimensions against Rows/Columns, RLE headers and segment lengths.

use dicom_dictionary_std::{tags, uids};

use super::{DicomError, malformed};

/// The frame's own codestream header (JPEG SOF, JPEG 2000 SIZ) must agree with
/// Rows/Columns: decoders allocate what the codestream declares.
pub(super) fn check_codestream(
    obj: &dicom_object::DefaultDicomObject,
    ts_uid: &str,
    rows: u32,
    columns: u32,
    frames: u32,
    bits_allocated: u32,
) -> Result<(), DicomError> {
    let Ok(Some(pixel)) = obj.element_opt(tags::PIXEL_DATA) else {
        return Err(DicomError::MissingPixelData);
    };
    let Some(first) = pixel.fragments().and_then(|f| f.first()) else {
        return Err(malformed("encapsulated pixel data has no fragment"));
    };
    if ts_uid == uids::RLE_LOSSLESS {
        check_rle_header(first, bits_allocated / 8)?;
        return check_rle_segments(first, bits_allocated / 8, rows as usize * columns as usize);
    }
    // The first frame's codestream, all of it: a single-frame object's fragments
    // together, else the first fragment (one fragment per frame).
    let frame: std::borrow::Cow<'_, [u8]> = match pixel.fragments() {
        Some(f) if frames == 1 && f.len() > 1 => f.concat().into(),
        _ => first.as_slice().into(),
    };
    // JPEG 2000 (.90–.93) and High-Throughput JPEG 2000 (.201–.203) carry a SIZ
    // marker; the other .4.x syntaxes are JPEG (SOF).
    let j2k =
        ts_uid.starts_with("1.2.840.10008.1.2.4.9") || ts_uid.starts_with("1.2.840.10008.1.2.4.20");
    let dims = if j2k {
        // A cut JPEG 2000 codestream still decodes (at a lower quality, by design):
        // refuse one without its end-of-codestream marker.
        if !j2k_ends_with_eoc(&frame) {
            return Err(malformed(
                "the JPEG 2000 codestream ends before its end-of-codestream marker (truncated?)",
            ));
        }
        j2k_dims(first)
    } else if ts_uid.starts_with("1.2.840.10008.1.2.4.") {
        crate::imaging::complete::jpeg(&frame).map_err(malformed)?;
        jpeg_dims(first)
    } else {
        // RLE and encapsulated-uncompressed: the decoder writes Rows × Columns.
        return Ok(());
    };
    match dims {
        Some((w, h)) if w == columns && h == rows => Ok(()),
        Some((w, h)) => Err(malformed(format!(
            "the compressed frame is {w}x{h} but Rows/Columns say {columns}x{rows}"
        ))),
        None => Err(malformed(
            "no frame header found in the compressed pixel data",
        )),
    }
}

/// Whether a JPEG 2000 codestream reaches its end-of-codestream marker (FF D9),
/// ignoring the padding after it: an odd-length codestream is padded to an even
/// fragment length (PS3.5 A.4 says with 0x00; writers also use 0xFF). Inside a
/// codestream FF D9 cannot occur before its end (bit stuffing keeps packet data below
/// FF 90), so a cut codestream never looks complete.
fn j2k_ends_with_eoc(frame: &[u8]) -> bool {
    let end = frame
        .iter()
        .rposition(|&b| b != 0x00 && b != 0xFF)
        .map_or(0, |i| i + 1);
    end >= 2 && frame[..end].ends_with(&[0xFF, 0xD9]) && frame.len() - end <= 8
}

/// Word `i` of an RLE fragment's 64-byte header (0: segment count, 1..=15: offsets).
fn rle_header_word(fragment: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([
        fragment[4 * i],
        fragment[4 * i + 1],
        fragment[4 * i + 2],
        fragment[4 * i + 3],
    ])
}

/// PS3.5 G.5: 64-byte header, one segment per byte of the sample, offsets inside the
/// fragment and increasing. (dicom-rs allocates the declared segment count unchecked.)
fn check_rle_header(fragment: &[u8], segments: u32) -> Result<(), DicomError> {
    if fragment.len() < 64 {
        return Err(malformed("RLE fragment shorter than its 64-byte header"));
    }
    let word = |i| rle_header_word(fragment, i);
    let n = word(0);
    if n != segments {
        return Err(malformed(format!(
            "RLE header declares {n} segments; a {}-bit grayscale frame has {segments}",
            segments * 8
        )));
    }
    let mut previous = 63;
    for i in 1..=n as usize {
        let offset = word(i);
        if offset <= previous || offset as usize >= fragment.len() {
            return Err(malformed(
                "RLE segment offsets are out of order or out of range",
            ));
        }
        previous = offset;
    }
    Ok(())
}

/// Each RLE segment (PS3.5 G.3, PackBits) must decode to at least one byte per pixel:
/// the decoder fills a short segment's missing rows instead of failing. The header
/// was checked by [`check_rle_header`].
fn check_rle_segments(fragment: &[u8], segments: u32, pixels: usize) -> Result<(), DicomError> {
    let word = |i| rle_header_word(fragment, i) as usize;
    for i in 1..=segments as usize {
        let end = if i < segments as usize {
            word(i + 1)
        } else {
            fragment.len()
        };
        let seg = &fragment[word(i)..end];
        let (mut pos, mut out) = (0usize, 0usize);
        while pos < seg.len() && out < pixels {
            let n = seg[pos] as i8;
            pos += 1;
            if n >= 0 {
                // n + 1 literal bytes.
                let k = n as usize + 1;
                pos += k;
                out += k;
            } else if n != -128 {
                // One byte repeated 1 - n times.
                pos += 1;
                out += (1 - i32::from(n)) as usize;
            }
        }
        if out < pixels || pos > seg.len() {
            return Err(malformed(format!(
                "RLE segment {i} decodes to fewer than the frame's {pixels} bytes (truncated?)"
            )));
        }
    }
    Ok(())
}

/// Width and height from a JPEG SOF marker.
fn jpeg_dims(b: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2;
    if b.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        let is_sof = (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let s = b.get(i + 5..i + 9)?;
            let h = u32::from(u16::from_be_bytes([s[0], s[1]]));
            let w = u32::from(u16::from_be_bytes([s[2], s[3]]));
            return Some((w, h));
        }
        i += 2 + len;
    }
    None
}

/// Width and height from a JPEG 2000 SIZ marker (raw codestream or JP2 wrapper).
fn j2k_dims(b: &[u8]) -> Option<(u32, u32)> {
    let at = b.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    let s = b.get(at + 8..at + 24)?;
    let be = |o: usize| u32::from_be_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
    let (xsiz, ysiz, xo, yo) = (be(0), be(4), be(8), be(12));
    Some((xsiz.checked_sub(xo)?, ysiz.checked_sub(yo)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn j2k_padding_after_the_end_marker_is_tolerated_and_a_cut_is_not() {
        let stream = [0xFF, 0x4F, 0xFF, 0x51, 0x12, 0x34, 0xFF, 0xD9];
        for pad in [&[][..], &[0x00], &[0xFF], &[0x00, 0x00], &[0xFF, 0x00]] {
            assert!(j2k_ends_with_eoc(&[&stream[..], pad].concat()), "{pad:?}");
        }
        for cut in [
            &stream[..7],
            &stream[..6],
            &[0xFF, 0x4F, 0x12, 0xFF][..],
            &[],
        ] {
            for pad in [&[][..], &[0x00], &[0xFF]] {
                assert!(!j2k_ends_with_eoc(&[cut, pad].concat()), "{cut:?} {pad:?}");
            }
        }
    }

    #[test]
    fn codestream_headers() {
        // JPEG: SOI, APP0 (len 4), SOF0 with height 30, width 40.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00,
            0x1E, 0x00, 0x28, 0x01,
        ];
        assert_eq!(jpeg_dims(&jpeg), Some((40, 30)));
        assert_eq!(jpeg_dims(&jpeg[2..]), None);
        // JPEG 2000: SOC, SIZ (Lsiz, Rsiz, Xsiz 50, Ysiz 20, XOsiz 10, YOsiz 0).
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for v in [50u32, 20, 10, 0] {
            j2k.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(j2k_dims(&j2k), Some((40, 20)));
        // RLE: 2 segments at 64 and 70 in a 80-byte fragment.
        let mut rle = vec![0u8; 80];
        rle[..4].copy_from_slice(&2u32.to_le_bytes());
        rle[4..8].copy_from_slice(&64u32.to_le_bytes());
        rle[8..12].copy_from_slice(&70u32.to_le_bytes());
        assert!(check_rle_header(&rle, 2).is_ok());
        assert!(check_rle_header(&rle, 1).is_err());
        rle[8..12].copy_from_slice(&700u32.to_le_bytes());
        assert!(check_rle_header(&rle, 2).is_err());
        rle[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_rle_header(&rle, 2).is_err());
    }
}
