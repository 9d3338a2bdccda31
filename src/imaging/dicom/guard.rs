//! The byte-level guard that runs before dicom-rs parses anything: every element's
//! declared length must fit in what is left of the body (dicom-rs would allocate it
//! first), the meta group's length must match its elements, sequences nest at most
//! [`MAX_SEQUENCE_DEPTH`] deep. (A compressed frame's own header is checked in
//! `codestream.rs`, once the attributes it must agree with are read.)

use dicom_dictionary_std::{StandardDataDictionary, tags};

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
    let mut walk = Walk {
        bytes,
        pos: start,
        in_pixel_sequence: false,
        open: Vec::new(),
    };
    while walk.pos < bytes.len() {
        walk.leave_ended();
        let pos = walk.pos;
        if bytes.len() - pos < 8 {
            return Err(malformed(format!("truncated element header at byte {pos}")));
        }
        let (group, element) = (walk.u16_at(pos), walk.u16_at(pos + 2));
        if group == 0xFFFE {
            walk.item(element)?;
        } else {
            walk.element(dicom_core::Tag(group, element), explicit)?;
        }
    }
    Ok(())
}

/// An undefined length.
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// The state of [`check_lengths`]'s walk.
struct Walk<'b> {
    bytes: &'b [u8],
    /// The next element header.
    pos: usize,
    /// Inside an encapsulated Pixel Data's fragments.
    in_pixel_sequence: bool,
    /// Open sequences and items: (is a sequence, end offset when the length is
    /// defined). dicom-rs parses nested sequences recursively, so their depth is
    /// capped here (this walk itself is a loop and needs no stack).
    open: Vec<(bool, Option<usize>)>,
}

impl Walk<'_> {
    fn u16_at(&self, p: usize) -> u16 {
        u16::from_le_bytes([self.bytes[p], self.bytes[p + 1]])
    }

    fn u32_at(&self, p: usize) -> u32 {
        let b = self.bytes;
        u32::from_le_bytes([b[p], b[p + 1], b[p + 2], b[p + 3]])
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Leaves every defined-length container that ends here.
    fn leave_ended(&mut self) {
        let pos = self.pos;
        while self
            .open
            .last()
            .is_some_and(|(_, end)| end.is_some_and(|e| pos >= e))
        {
            self.open.pop();
        }
    }

    /// Opens a sequence or an item (ending at `end` when its length is defined).
    fn enter(&mut self, sequence: bool, end: Option<usize>, at: usize) -> Result<(), DicomError> {
        self.open.push((sequence, end));
        let depth = self.open.iter().filter(|(sq, _)| *sq).count();
        if depth > MAX_SEQUENCE_DEPTH {
            return Err(malformed(format!(
                "sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels at byte {at}"
            )));
        }
        Ok(())
    }

    /// Closes the innermost open undefined-length sequence (or item).
    fn close(&mut self, sequence: bool) {
        if let Some(i) = self
            .open
            .iter()
            .rposition(|(sq, end)| *sq == sequence && end.is_none())
        {
            self.open.truncate(i);
        }
    }

    /// An item (E000): entered (nested elements or a pixel fragment); delimiters
    /// (E00D, E0DD) have no value.
    fn item(&mut self, element: u16) -> Result<(), DicomError> {
        let len = self.u32_at(self.pos + 4);
        let at = self.pos;
        self.pos += 8;
        if element == 0xE000 && len != UNDEFINED && len as usize > self.left() {
            return Err(malformed(format!(
                "item at byte {at} declares {len} bytes; {} are left",
                self.left()
            )));
        }
        if self.in_pixel_sequence {
            match element {
                // A compressed fragment: raw bytes, skipped.
                0xE000 if len != UNDEFINED => self.pos += len as usize,
                0xE0DD => self.in_pixel_sequence = false,
                _ => return Err(malformed(format!("bad pixel fragment at byte {at}"))),
            }
            return Ok(());
        }
        match element {
            0xE000 => {
                let end = (len != UNDEFINED).then_some(self.pos + len as usize);
                self.enter(false, end, at)?;
            }
            // Item delimiter: close the innermost undefined-length item.
            0xE00D => self.close(false),
            // Sequence delimiter: close the innermost undefined-length sequence.
            0xE0DD => self.close(true),
            _ => {}
        }
        Ok(())
    }

    /// A data element: its value skipped, or entered when it is a sequence (or of
    /// undefined length), or the start of encapsulated pixel data.
    fn element(&mut self, tag: dicom_core::Tag, explicit: bool) -> Result<(), DicomError> {
        let (bytes, pos) = (self.bytes, self.pos);
        let (is_container, len, header) = if explicit {
            let (len, header) = explicit_header(bytes, pos)?;
            (&bytes[pos + 4..pos + 6] == b"SQ", len, header)
        } else {
            use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
            let sq = StandardDataDictionary
                .by_tag(tag)
                .is_some_and(|e| matches!(e.vr().relaxed(), dicom_core::VR::SQ));
            (sq, self.u32_at(pos + 4), 8)
        };
        let at = pos;
        self.pos += header;
        if tag == tags::PIXEL_DATA && len == UNDEFINED {
            self.in_pixel_sequence = true;
            return Ok(());
        }
        if len != UNDEFINED && len as usize > self.left() {
            return Err(malformed(format!(
                "element ({:04X},{:04X}) at byte {at} declares {len} bytes; {} are left",
                tag.0,
                tag.1,
                self.left()
            )));
        }
        if is_container || len == UNDEFINED {
            // Enter the sequence (an undefined-length value is parsed as one): its
            // items follow.
            let end = (len != UNDEFINED).then_some(self.pos + len as usize);
            return self.enter(true, end, at);
        }
        self.pos += len as usize;
        Ok(())
    }
}

#[cfg(test)]
#[path = "guard_tests.rs"]
mod tests;
