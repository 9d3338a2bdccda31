//! The byte-level guard that runs before dicom-rs parses anything: every element's
//! declared length must fit in what is left of the body (dicom-rs would allocate it
//! first), the meta group's length must match its elements, sequences nest at most
//! [`MAX_SEQUENCE_DEPTH`] deep, and a compressed frame's own header (JPEG, JPEG 2000,
//! RLE) must agree with Rows/Columns before a codec sees it.

use dicom_dictionary_std::{StandardDataDictionary, tags, uids};

use super::{DicomError, MAX_SEQUENCE_DEPTH, malformed};

/// The file meta group (explicit VR little endian, group 0002) from `start`: every
/// declared length fits, and (0002,0000) FileMetaInformationGroupLength, when present,
/// ends exactly where the group's elements end. Returns where the data set starts.
pub(super) fn check_meta_group(bytes: &[u8], start: usize) -> Result<usize, DicomError> {
    let mut pos = start;
    let mut declared_end = None;
    while bytes.len() - pos >= 8 && bytes[pos..pos + 2] == [0x02, 0x00] {
        let element = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let (len, header) = explicit_header(bytes, pos)?;
        if len as usize > bytes.len() - pos - header {
            return Err(malformed(format!(
                "meta element (0002,{element:04X}) declares {len} bytes; {} are left",
                bytes.len() - pos - header
            )));
        }
        if element == 0x0000 && len == 4 {
            let v = &bytes[pos + 8..pos + 12];
            let group_len = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize;
            declared_end = Some(pos + 12 + group_len);
        }
        pos += header + len as usize;
    }
    if pos == start {
        return Err(malformed("no file meta group after the DICM magic"));
    }
    if declared_end.is_some_and(|end| end != pos) {
        return Err(malformed(
            "the file meta group length does not match its elements",
        ));
    }
    Ok(pos)
}

/// VRs whose explicit header has a 4-byte length (after 2 reserved bytes).
const LONG_VRS: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];
/// VRs whose explicit header has a 2-byte length.
const SHORT_VRS: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];

/// An explicit VR element header at `pos`: (value length, header length). Unknown VR
/// codes are refused, so this walk and the parser's never disagree on the layout.
fn explicit_header(bytes: &[u8], pos: usize) -> Result<(u32, usize), DicomError> {
    let vr = [bytes[pos + 4], bytes[pos + 5]];
    if LONG_VRS.contains(&&vr) {
        if bytes.len() - pos < 12 {
            return Err(malformed(format!("truncated element header at byte {pos}")));
        }
        let l = &bytes[pos + 8..pos + 12];
        Ok((u32::from_le_bytes([l[0], l[1], l[2], l[3]]), 12))
    } else if SHORT_VRS.contains(&&vr) {
        Ok((
            u32::from(u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]])),
            8,
        ))
    } else {
        Err(malformed(format!(
            "unknown value representation {:?} at byte {pos}",
            String::from_utf8_lossy(&vr)
        )))
    }
}

/// Walks every element header of the data set (from `start`, in its transfer
/// syntax's VR encoding) and refuses a declared length longer than the bytes left:
/// the parser allocates a value's declared length before reading it, so a 1 kB body
/// could otherwise claim gigabytes. Sequences and items are entered, not skipped, so
/// nested lengths are checked too.
pub(super) fn check_lengths(bytes: &[u8], start: usize, explicit: bool) -> Result<(), DicomError> {
    const UNDEFINED: u32 = 0xFFFF_FFFF;
    let dict = StandardDataDictionary;
    let mut pos = start;
    let mut in_pixel_sequence = false;
    // Open sequences and items: (is a sequence, end offset when the length is defined).
    // dicom-rs parses nested sequences recursively, so their depth is capped here
    // (this walk itself is a loop and needs no stack).
    let mut open: Vec<(bool, Option<usize>)> = Vec::new();
    let u16_at = |p: usize| u16::from_le_bytes([bytes[p], bytes[p + 1]]);
    let u32_at =
        |p: usize| u32::from_le_bytes([bytes[p], bytes[p + 1], bytes[p + 2], bytes[p + 3]]);
    let enter = |open: &mut Vec<(bool, Option<usize>)>,
                 sequence: bool,
                 end: Option<usize>,
                 at: usize|
     -> Result<(), DicomError> {
        open.push((sequence, end));
        let depth = open.iter().filter(|(sq, _)| *sq).count();
        if depth > MAX_SEQUENCE_DEPTH {
            return Err(malformed(format!(
                "sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels at byte {at}"
            )));
        }
        Ok(())
    };
    while pos < bytes.len() {
        // Leave every defined-length container that ends here.
        while open
            .last()
            .is_some_and(|(_, end)| end.is_some_and(|e| pos >= e))
        {
            open.pop();
        }
        if bytes.len() - pos < 8 {
            return Err(malformed(format!("truncated element header at byte {pos}")));
        }
        let group = u16_at(pos);
        let element = u16_at(pos + 2);
        let tag = dicom_core::Tag(group, element);
        if group == 0xFFFE {
            // Item (E000): enter it (nested elements or a pixel fragment);
            // delimiters (E00D, E0DD) have no value.
            let len = u32_at(pos + 4);
            let at = pos;
            pos += 8;
            if element == 0xE000 && len != UNDEFINED && len as usize > bytes.len() - pos {
                return Err(malformed(format!(
                    "item at byte {at} declares {len} bytes; {} are left",
                    bytes.len() - pos
                )));
            }
            if in_pixel_sequence {
                match element {
                    // A compressed fragment: raw bytes, skipped.
                    0xE000 if len != UNDEFINED => pos += len as usize,
                    0xE0DD => in_pixel_sequence = false,
                    _ => return Err(malformed(format!("bad pixel fragment at byte {at}"))),
                }
                continue;
            }
            match element {
                0xE000 => {
                    let end = (len != UNDEFINED).then_some(pos + len as usize);
                    enter(&mut open, false, end, at)?;
                }
                // Item delimiter: close the innermost undefined-length item.
                0xE00D => {
                    if let Some(i) = open.iter().rposition(|(sq, end)| !sq && end.is_none()) {
                        open.truncate(i);
                    }
                }
                // Sequence delimiter: close the innermost undefined-length sequence.
                0xE0DD => {
                    if let Some(i) = open.iter().rposition(|(sq, end)| *sq && end.is_none()) {
                        open.truncate(i);
                    }
                }
                _ => {}
            }
            continue;
        }
        let (is_container, len, header) = if explicit {
            let (len, header) = explicit_header(bytes, pos)?;
            (&bytes[pos + 4..pos + 6] == b"SQ", len, header)
        } else {
            use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
            let sq = dict
                .by_tag(tag)
                .is_some_and(|e| matches!(e.vr().relaxed(), dicom_core::VR::SQ));
            (sq, u32_at(pos + 4), 8)
        };
        let at = pos;
        pos += header;
        if tag == tags::PIXEL_DATA && len == UNDEFINED {
            in_pixel_sequence = true;
            continue;
        }
        if len != UNDEFINED && len as usize > bytes.len() - pos {
            return Err(malformed(format!(
                "element ({group:04X},{element:04X}) at byte {at} declares {len} bytes; {} are left",
                bytes.len() - pos
            )));
        }
        if is_container || len == UNDEFINED {
            // Enter the sequence (an undefined-length value is parsed as one): its
            // items follow.
            let end = (len != UNDEFINED).then_some(pos + len as usize);
            enter(&mut open, true, end, at)?;
            continue;
        }
        pos += len as usize;
    }
    Ok(())
}

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
        // refuse one without its end-of-codestream marker (fragments are padded to an
        // even length with zeros).
        let end = frame.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !frame[..end].ends_with(&[0xFF, 0xD9]) {
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
#[path = "guard_tests.rs"]
mod tests;
