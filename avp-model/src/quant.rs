//! ggml tensor types and their dequantization to f32 (the layouts of llama.cpp's
//! `ggml-quants.c`, checked against the `gguf` Python package's implementation).

use half::{bf16, f16};

/// A ggml tensor type (variant names follow ggml's).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 32 values: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 values: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 values: f16 scale, 5-bit values offset by 16.
    Q5_0,
    /// 32 values: f16 scale, 8-bit values.
    Q8_0,
    /// 256 values: super-block scale and minimum, 8 sub-blocks with 6-bit scales, 4-bit values.
    Q4_K,
    /// 256 values: 16 sub-blocks with 8-bit scales, 6-bit values.
    Q6_K,
    /// Any other ggml type (its id); tensors of it can be read but not dequantized.
    Other(u32),
}

impl GgmlType {
    /// The type of a ggml type id.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::Bf16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q6_K => 14,
            GgmlType::Bf16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// (values per block, bytes per block), for the types this crate reads.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q6_K => (256, 210),
            GgmlType::Other(_) => return None,
        })
    }

    /// Bytes of `n` values, if `n` is a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (per, size) = self.block()?;
        if !n.is_multiple_of(per as u64) {
            return None;
        }
        (n / per as u64).checked_mul(size as u64)
    }
}

fn h(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Dequantize `data` (whole blocks of `ty`) into `out`, which must hold exactly the
/// number of values the blocks encode. Returns `false` for types it cannot read or
/// mismatched lengths (callers check those first).
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> bool {
    let Some((per, size)) = ty.block() else {
        return false;
    };
    if !data.len().is_multiple_of(size) || data.len() / size * per != out.len() {
        return false;
    }
    let blocks = data.chunks_exact(size).zip(out.chunks_exact_mut(per));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = h(b, 0)),
        GgmlType::Bf16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = h(b, 0);
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (h(b, 0), h(b, 2));
            for j in 0..16 {
                y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let d = h(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let hi0 = ((qh >> j) << 4) & 0x10;
                let hi1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((b[6 + j] & 0x0F) as u32 | hi0) as i32 - 16) as f32 * d;
                y[j + 16] = (((b[6 + j] >> 4) as u32 | hi1) as i32 - 16) as f32 * d;
            }
        }),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = h(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            // 6-bit scale and minimum of sub-block j.
            let sm = |j: usize| -> (f32, f32) {
                if j < 4 {
                    ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
                } else {
                    (
                        ((scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4)) as f32,
                        ((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)) as f32,
                    )
                }
            };
            for chunk in 0..4 {
                let (s1, m1) = sm(2 * chunk);
                let (s2, m2) = sm(2 * chunk + 1);
                let q = &qs[chunk * 32..chunk * 32 + 32];
                let y = &mut y[chunk * 64..chunk * 64 + 64];
                for l in 0..32 {
                    y[l] = d * s1 * (q[l] & 0x0F) as f32 - dmin * m1;
                    y[l + 32] = d * s2 * (q[l] >> 4) as f32 - dmin * m2;
                }
            }
        }),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| {
            let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], h(b, 208));
            for half_ in 0..2 {
                let (ql, qh) = (&ql[half_ * 64..], &qh[half_ * 32..]);
                let sc = &sc[half_ * 8..];
                let y = &mut y[half_ * 128..half_ * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                    y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                    y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                    y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                }
            }
        }),
        GgmlType::Other(_) => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks and values produced by llama.cpp's `gguf` Python package
    /// (`tests/data/make_dequant_vectors.py`).
    #[test]
    fn matches_the_reference_implementation() {
        let text = include_str!("../tests/data/dequant_vectors.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        for (name, ty) in [
            ("Q4_0", GgmlType::Q4_0),
            ("Q4_1", GgmlType::Q4_1),
            ("Q5_0", GgmlType::Q5_0),
            ("Q8_0", GgmlType::Q8_0),
            ("Q4_K", GgmlType::Q4_K),
            ("Q6_K", GgmlType::Q6_K),
        ] {
            let case = &v[name];
            let hex = case["bytes_hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let mut got = vec![0f32; want.len()];
            assert!(dequantize_into(ty, &bytes, &mut got), "{name}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{name}[{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn plain_floats_and_bad_lengths() {
        let mut out = [0f32; 2];
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(dequantize_into(GgmlType::F32, &data, &mut out));
        assert_eq!(out, [1.5, -2.0]);
        let data: Vec<u8> = [f16::from_f32(0.5), f16::from_f32(3.0)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(dequantize_into(GgmlType::F16, &data, &mut out));
        assert_eq!(out, [0.5, 3.0]);
        assert!(!dequantize_into(
            GgmlType::Q8_0,
            &[0u8; 33],
            &mut [0f32; 32]
        ));
        assert!(!dequantize_into(
            GgmlType::Other(99),
            &[0u8; 4],
            &mut [0f32; 1]
        ));
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
        assert_eq!(GgmlType::from_id(GgmlType::Q6_K.id()), GgmlType::Q6_K);
    }
}
