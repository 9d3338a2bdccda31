//! The stored values (BitsStored bits, sign-extended) and the VOI stage (PS3.3
//! C.11.2): window centre/width with its VOI LUT function, the
//! VOI LUT Sequence's table (read here: its descriptor's count, first value and bit
//! depth, 8-bit data packed or not), and min–max when the file gives neither.

use dicom_dictionary_std::tags;
use dicom_pixeldata::{VoiLutFunction, WindowLevel};

use super::{DicomError, malformed};

/// PS3.3 C.11.2.1.2: window center/width to [0, 255], in place.
pub(super) fn apply_window(values: &mut [f64], w: WindowLevel, function: VoiLutFunction) {
    let (c, wd) = (w.center, w.width);
    for v in values {
        let x = *v;
        *v = match function {
            VoiLutFunction::Linear => {
                let lo = c - 0.5 - (wd - 1.0) / 2.0;
                let hi = c - 0.5 + (wd - 1.0) / 2.0;
                if x <= lo {
                    0.0
                } else if x > hi || wd <= 1.0 {
                    255.0
                } else {
                    ((x - (c - 0.5)) / (wd - 1.0) + 0.5) * 255.0
                }
            }
            VoiLutFunction::LinearExact => {
                if x <= c - wd / 2.0 {
                    0.0
                } else if x > c + wd / 2.0 {
                    255.0
                } else {
                    ((x - c) / wd + 0.5) * 255.0
                }
            }
            VoiLutFunction::Sigmoid => 255.0 / (1.0 + (-4.0 * (x - c) / wd).exp()),
        };
    }
}

/// The first item of a VOI LUT Sequence (PS3.3 C.11.2.1.1).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct VoiTable {
    /// The first stored value mapped (LUT Descriptor's second value).
    pub(super) first: i32,
    /// Bits per entry (its third value).
    pub(super) bits: u8,
    /// One value per entry.
    pub(super) table: Vec<u16>,
}

/// Reads the first VOI LUT Sequence item, as writers store it: the entry count 0
/// meaning 2^16; the first mapped value signed when the pixels are; 8-bit entries
/// either one per 16-bit value or packed two per 16-bit word (OW, low byte first: the
/// LUT Data then holds half as many words as entries, as dcmtk reads it). Any other
/// length is refused, never guessed at.
pub(super) fn voi_lut(
    obj: &dicom_object::InMemDicomObject,
    signed: bool,
) -> Result<Option<VoiTable>, DicomError> {
    use dicom_core::value::PrimitiveValue;
    let Some(seq) = obj.element_opt(tags::VOILUT_SEQUENCE).ok().flatten() else {
        return Ok(None);
    };
    let Some(item) = seq.items().and_then(|i| i.first()) else {
        return Ok(None);
    };
    let unusable = |why: String| DicomError::Unprocessable(super::Unsupported::VoiLut(why));
    let desc = item
        .element_opt(tags::LUT_DESCRIPTOR)
        .ok()
        .flatten()
        .ok_or_else(|| unusable("its item has no LUT Descriptor".into()))?
        .to_multi_int::<i32>()
        .map_err(|_| unusable("the LUT Descriptor is not three integers".into()))?;
    let [count, first, bits] = desc[..] else {
        return Err(unusable(format!(
            "the LUT Descriptor has {} values, not 3",
            desc.len()
        )));
    };
    // US or SS: read back as the 16-bit pattern it was written with.
    let entries = match count as u16 {
        0 => 65_536,
        n => usize::from(n),
    };
    let first = if signed {
        i32::from(first as u16 as i16)
    } else {
        i32::from(first as u16)
    };
    if !(1..=16).contains(&bits) {
        return Err(unusable(format!("{bits} bits per entry")));
    }
    let data = item
        .element_opt(tags::LUT_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| unusable("its item has no LUT Data".into()))?;
    let words: Vec<u16> = match data.value().primitive() {
        Some(PrimitiveValue::U16(v)) => v.to_vec(),
        Some(PrimitiveValue::U8(b)) => b
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
            .collect(),
        _ => return Err(unusable("the LUT Data is not 16-bit values".into())),
    };
    let table: Vec<u16> = if words.len() == entries {
        words
    } else if bits <= 8 && words.len() == entries.div_ceil(2) {
        words
            .iter()
            .flat_map(|w| [w & 0xff, w >> 8])
            .take(entries)
            .collect()
    } else {
        return Err(unusable(format!(
            "the LUT Data holds {} 16-bit values for {entries} entries of {bits} bits",
            words.len()
        )));
    };
    Ok(Some(VoiTable {
        first,
        bits: bits as u8,
        table,
    }))
}

/// PS3.3 C.11.2.1.1: a VOI LUT table (first mapped value, entries, bits) to [0, 255],
/// in place. `table` must not be empty.
pub(super) fn apply_voi_lut(values: &mut [f64], first: i32, bits: u8, table: &[u16]) {
    let last = table.len() - 1;
    let max_out = ((1u64 << bits.clamp(1, 16)) - 1) as f64;
    let first = f64::from(first);
    for v in values {
        let i = (v.round() - first).clamp(0.0, last as f64) as usize;
        *v = (f64::from(table[i]) / max_out * 255.0).clamp(0.0, 255.0);
    }
}

/// No VOI given: stretch the frame's own range to [0, 255], in place.
pub(super) fn min_max(values: &mut [f64]) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for v in values {
        *v = if hi <= lo {
            0.0
        } else {
            (*v - lo) / (hi - lo) * 255.0
        };
    }
}

/// Stored sample values of one frame: `BitsStored` low bits, sign-extended if signed.
pub(super) fn stored_values(
    data: &[u8],
    n: usize,
    bits_allocated: u32,
    bits_stored: u32,
    signed: bool,
) -> Result<Vec<f64>, DicomError> {
    let bytes_per = (bits_allocated / 8) as usize;
    if data.len() < n * bytes_per {
        return Err(malformed(format!(
            "the pixel data holds {} bytes; the frame needs {}",
            data.len(),
            n * bytes_per
        )));
    }
    let mask: u32 = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1 << bits_stored) - 1
    };
    let sign_bit = 1u32 << (bits_stored - 1);
    let value = |raw: u32| -> f64 {
        let v = raw & mask;
        if signed && v & sign_bit != 0 {
            f64::from(v) - f64::from(mask) - 1.0
        } else {
            f64::from(v)
        }
    };
    Ok(if bytes_per == 1 {
        data[..n].iter().map(|&b| value(u32::from(b))).collect()
    } else {
        data[..2 * n]
            .chunks_exact(2)
            .map(|c| value(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_functions_follow_ps3_3() {
        let w = WindowLevel {
            center: 100.0,
            width: 51.0,
        };
        // LINEAR: x <= c - 0.5 - (w-1)/2 = 74.5 → 0; x > c - 0.5 + (w-1)/2 = 124.5 → 255.
        let applied = |xs: &[f64], f| {
            let mut y = xs.to_vec();
            apply_window(&mut y, w, f);
            y
        };
        let y = applied(&[74.5, 75.0, 99.5, 124.5, 125.0], VoiLutFunction::Linear);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 0.5 / 50.0 * 255.0).abs() < 1e-9);
        assert!((y[2] - 127.5).abs() < 1e-9);
        assert!((y[3] - 255.0).abs() < 1e-9);
        assert_eq!(y[4], 255.0);
        // LINEAR_EXACT: c ± w/2.
        let y = applied(&[74.5, 100.0, 125.5], VoiLutFunction::LinearExact);
        assert_eq!(y, vec![0.0, 127.5, 255.0]);
        // SIGMOID: half-way at the center, monotone.
        let y = applied(&[0.0, 100.0, 200.0], VoiLutFunction::Sigmoid);
        assert!((y[1] - 127.5).abs() < 1e-9 && y[0] < 1.0 && y[2] > 254.0);
    }

    #[test]
    fn voi_lut_table_and_min_max() {
        // Table of 3 entries, 8-bit output, first mapped value 10: below → first entry,
        // above → last.
        let mut y = vec![0.0, 10.0, 11.0, 12.0, 99.0];
        apply_voi_lut(&mut y, 10, 8, &[0, 51, 255]);
        assert_eq!(y, vec![0.0, 0.0, 51.0, 255.0, 255.0]);
        let mut y = vec![11.0];
        apply_voi_lut(&mut y, 10, 16, &[0, 65535]);
        assert_eq!(y, vec![255.0]);
        let mut y = vec![5.0, 5.0];
        min_max(&mut y);
        assert_eq!(y, vec![0.0, 0.0]);
        let mut y = vec![-10.0, 0.0, 10.0];
        min_max(&mut y);
        assert_eq!(y, vec![0.0, 127.5, 255.0]);
    }

    #[test]
    fn stored_values_mask_and_sign_extend() {
        // 12-bit signed in 16-bit words: 0x0FFF = −1, 0x0800 = −2048, 0x07FF = 2047;
        // bits above BitsStored (0xF000) are ignored.
        let words: Vec<u8> = [0x0FFFu16, 0x0800, 0x07FF, 0xF001]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(
            stored_values(&words, 4, 16, 12, true).unwrap(),
            vec![-1.0, -2048.0, 2047.0, 1.0]
        );
        assert_eq!(
            stored_values(&words, 4, 16, 12, false).unwrap(),
            vec![4095.0, 2048.0, 2047.0, 1.0]
        );
        assert!(stored_values(&words, 5, 16, 12, false).is_err());
    }
}
