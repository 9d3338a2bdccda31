//! Unit tests of `guard.rs`.

use super::*;

/// An explicit VR little endian element: tag, VR, length field (2 or 4 bytes by
/// VR, PS3.5 7.1.2), value. The length is written as given, so it may lie.
fn explicit(group: u16, element: u16, vr: &[u8; 2], len: u32, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(group.to_le_bytes());
    b.extend(element.to_le_bytes());
    b.extend(vr);
    if LONG_VRS.contains(&vr) {
        b.extend([0, 0]);
        b.extend(len.to_le_bytes());
    } else {
        b.extend((len as u16).to_le_bytes());
    }
    b.extend(value);
    b
}

/// An implicit VR little endian element: tag, 4-byte length, value.
fn implicit(group: u16, element: u16, len: u32, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(group.to_le_bytes());
    b.extend(element.to_le_bytes());
    b.extend(len.to_le_bytes());
    b.extend(value);
    b
}

#[test]
fn lengths_that_fit_pass_and_lengths_past_the_end_are_refused() {
    let mut ok = explicit(0x0010, 0x0010, b"PN", 4, b"AB^C");
    ok.extend(explicit(0x0008, 0x0060, b"CS", 2, b"CR"));
    ok.extend(explicit(0x0009, 0x0010, b"OB", 2, &[1, 2]));
    assert!(check_lengths(&ok, 0, true).is_ok());
    // One byte more than is left: short and long length fields, and implicit VR.
    let short = explicit(0x0010, 0x0010, b"PN", 5, b"AB^C");
    assert!(matches!(
        check_lengths(&short, 0, true),
        Err(DicomError::Malformed(_))
    ));
    let long = explicit(0x0009, 0x0010, b"OB", 3, &[1, 2]);
    assert!(check_lengths(&long, 0, true).is_err());
    let huge = explicit(0x0009, 0x0010, b"UN", 0xFFFF_FFF0, &[1, 2]);
    assert!(check_lengths(&huge, 0, true).is_err());
    assert!(check_lengths(&implicit(0x0010, 0x0010, 4, b"AB^C"), 0, false).is_ok());
    assert!(check_lengths(&implicit(0x0010, 0x0010, 5, b"AB^C"), 0, false).is_err());
    // A header cut short, and a VR code that does not exist.
    assert!(check_lengths(&ok[..ok.len() - 3], 0, true).is_err());
    assert!(check_lengths(&explicit(0x0010, 0x0010, b"ZZ", 2, b"AB"), 0, true).is_err());
    // The walk starts where it is told: a valid tail after junk passes.
    let mut tail = vec![0xFF; 7];
    tail.extend(&ok);
    assert!(check_lengths(&tail, 7, true).is_ok());
}

#[test]
fn sequences_nest_at_most_max_depth() {
    // `depth` sequences of undefined length, each holding one item of undefined
    // length, closed by item and sequence delimiters.
    let nested = |depth: usize| {
        let mut b = Vec::new();
        for _ in 0..depth {
            b.extend(explicit(0x0040, 0x0260, b"SQ", 0xFFFF_FFFF, &[]));
            b.extend(implicit(0xFFFE, 0xE000, 0xFFFF_FFFF, &[]));
        }
        for _ in 0..depth {
            b.extend(implicit(0xFFFE, 0xE00D, 0, &[]));
            b.extend(implicit(0xFFFE, 0xE0DD, 0, &[]));
        }
        b
    };
    assert!(check_lengths(&nested(MAX_SEQUENCE_DEPTH), 0, true).is_ok());
    assert!(check_lengths(&nested(MAX_SEQUENCE_DEPTH + 1), 0, true).is_err());
}

#[test]
fn meta_group_length_must_match_its_elements() {
    let ts = b"1.2.840.10008.1.2.1\0";
    let body = explicit(0x0002, 0x0010, b"UI", ts.len() as u32, ts);
    let group = |declared: u32| {
        let mut b = explicit(0x0002, 0x0000, b"UL", 4, &declared.to_le_bytes());
        b.extend(&body);
        b.extend(explicit(0x0008, 0x0060, b"CS", 2, b"CR"));
        b
    };
    let good = group(body.len() as u32);
    // Returns where the data set starts: after the group's last element.
    assert_eq!(check_meta_group(&good, 0).unwrap(), 12 + body.len());
    assert!(check_meta_group(&group(body.len() as u32 + 2), 0).is_err());
    assert!(check_meta_group(&group(body.len() as u32 - 2), 0).is_err());
    // An element whose declared length runs past the end.
    let cut = explicit(0x0002, 0x0010, b"UI", 40, ts);
    assert!(check_meta_group(&cut, 0).is_err());
    // No meta element at all.
    assert!(check_meta_group(&explicit(0x0008, 0x0060, b"CS", 2, b"CR"), 0).is_err());
}
