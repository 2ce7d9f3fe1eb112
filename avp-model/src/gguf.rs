//! A reader for GGUF files (v2 and v3): metadata, tensor directory, and tensor
//! data in place (memory-mapped), with dequantization to f32.
//!
//! Every count and length is checked against the bytes that remain before
//! anything is allocated, so a malformed or hostile file yields an error, never a
//! panic or an outsized allocation.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{ModelError, Result};
use crate::quant::{GgmlType, dequantize_into};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// u8.
    U8(u8),
    /// i8.
    I8(i8),
    /// u16.
    U16(u16),
    /// i16.
    I16(i16),
    /// u32.
    U32(u32),
    /// i32.
    I32(i32),
    /// f32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
    /// u64.
    U64(u64),
    /// i64.
    I64(i64),
    /// f64.
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) => u64::try_from(v).ok()?,
            Value::I16(v) => u64::try_from(v).ok()?,
            Value::I32(v) => u64::try_from(v).ok()?,
            Value::I64(v) => u64::try_from(v).ok()?,
            _ => return None,
        })
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. "blk.0.attn_q.weight".
    pub name: String,
    /// Dimensions, innermost first (ggml order: `dims[0]` is the row length).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of elements.
    pub elements: u64,
}

/// An opened GGUF file.
pub struct GgufFile {
    map: memmap2::Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: HashMap<String, Value>,
    /// Tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: &str) -> ModelError {
        ModelError::Gguf(format!("{what} at byte {}", self.pos))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.bad(&format!("truncated {what}")))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, "u32")?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, "u64")?.try_into().expect("8 bytes"),
        ))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    /// A count of items of at least `min_size` bytes each, checked against what remains.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(min_size as u64) > self.remaining() as u64 {
            return Err(self.bad(&format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let s = self.take(n, "string")?;
        String::from_utf8(s.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        let one = |c: &mut Self, n| c.take(n, "value");
        Ok(match ty {
            0 => Value::U8(one(self, 1)?[0]),
            1 => Value::I8(one(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(one(self, 2)?.try_into().expect("2"))),
            3 => Value::I16(i16::from_le_bytes(one(self, 2)?.try_into().expect("2"))),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(one(self, 1)?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.bad(&format!("unknown array element type {t}"))),
                };
                let n = self.count(min, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.bad(&format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Open and index a GGUF file (the tensor data stays in the mapping).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is mapped read-only; model files are not modified while
        // in use (the cache writes a new file and renames it into place).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(map)
    }

    fn parse(map: memmap2::Mmap) -> Result<GgufFile> {
        let mut c = Cursor { b: &map, pos: 0 };
        if c.take(4, "magic")? != MAGIC {
            return Err(ModelError::Gguf(
                "not a GGUF file (magic is not \"GGUF\")".into(),
            ));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Gguf(format!(
                "GGUF version {version} is not supported (2 or 3)"
            )));
        }
        let n_tensors = c.count(24, "tensor")?;
        let n_kv = c.count(12, "metadata")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.bad(&format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let ty = GgmlType::from_id(c.u32()?);
            let offset = c.u64()?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.bad(&format!("tensor {name} is too large")))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                elements,
            });
        }
        let align = match metadata.get("general.alignment").and_then(Value::as_u64) {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
            Some(a) => {
                return Err(ModelError::Gguf(format!(
                    "general.alignment {a} is not a power of two"
                )));
            }
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(align) * align;
        let data_len = (map.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            if let Some(bytes) = t.ty.bytes_for(t.elements) {
                let end = t.offset.checked_add(bytes);
                if t.offset % align != 0 || end.is_none_or(|e| e > data_len) {
                    return Err(ModelError::Gguf(format!(
                        "tensor {} ({} bytes at offset {}) lies outside the data section of {data_len} bytes",
                        t.name, bytes, t.offset
                    )));
                }
            }
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            data_start: data_start as usize,
            map,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::Missing(format!("metadata key {key}")))
    }

    /// A tensor's directory entry.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ModelError::Missing(format!("tensor {name}")))
    }

    /// A tensor's raw bytes, in place.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let len = t.ty.bytes_for(t.elements).ok_or(ModelError::Unsupported {
            name: t.name.clone(),
            ty: t.ty.id(),
        })?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.map[start..start + len as usize])
    }

    /// A tensor's values as f32 (dequantized), in ggml order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        let bytes = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.elements as usize];
        if !dequantize_into(t.ty, bytes, &mut out) {
            return Err(ModelError::Unsupported {
                name: t.name.clone(),
                ty: t.ty.id(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small GGUF writer for tests.
    fn gguf(
        meta: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], GgmlType, Vec<u8>)],
    ) -> Vec<u8> {
        let s = |v: &mut Vec<u8>, x: &str| {
            v.extend_from_slice(&(x.len() as u64).to_le_bytes());
            v.extend_from_slice(x.as_bytes());
        };
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        v.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, ty, bytes) in meta {
            s(&mut v, k);
            v.extend_from_slice(&ty.to_le_bytes());
            v.extend_from_slice(bytes);
        }
        let mut offset = 0u64;
        let mut data = Vec::new();
        for (name, dims, ty, bytes) in tensors {
            s(&mut v, name);
            v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| v.extend_from_slice(&d.to_le_bytes()));
            v.extend_from_slice(&ty.id().to_le_bytes());
            v.extend_from_slice(&offset.to_le_bytes());
            data.extend_from_slice(bytes);
            while !data.len().is_multiple_of(32) {
                data.push(0);
            }
            offset = data.len() as u64;
        }
        while !v.len().is_multiple_of(32) {
            v.push(0);
        }
        v.extend_from_slice(&data);
        v
    }

    fn open(bytes: &[u8]) -> Result<GgufFile> {
        let dir = std::env::temp_dir().join(format!(
            "avp-gguf-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&dir, bytes).unwrap();
        let r = GgufFile::open(&dir);
        std::fs::remove_file(&dir).unwrap();
        r
    }

    fn sample() -> Vec<u8> {
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&2u64.to_le_bytes());
        for t in ["<s>", "hé"] {
            arr.extend_from_slice(&(t.len() as u64).to_le_bytes());
            arr.extend_from_slice(t.as_bytes());
        }
        let mut name = (5u64).to_le_bytes().to_vec();
        name.extend_from_slice(b"llama");
        let f: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        gguf(
            &[
                ("general.architecture", 8, name),
                ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
                ("llama.rope.freq_base", 6, 100000f32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.tokens", 9, arr),
            ],
            &[
                ("a.weight", &[3, 2], GgmlType::F32, f),
                ("b.weight", &[32], GgmlType::Q8_0, {
                    let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
                    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
                    b
                }),
            ],
        )
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = open(&sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(
            g.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(g.get("llama.block_count").unwrap().as_u64(), Some(30));
        assert_eq!(
            g.get("llama.rope.freq_base").unwrap().as_f64(),
            Some(100000.0)
        );
        let toks = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks[1].as_str(), Some("hé"));
        let a = g.tensor("a.weight").unwrap();
        assert_eq!((a.dims.as_slice(), a.elements), (&[3u64, 2][..], 6));
        assert_eq!(
            g.dequantize("a.weight").unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        let b = g.dequantize("b.weight").unwrap();
        assert_eq!((b[0], b[16], b[31]), (-8.0, 0.0, 7.5));
        assert!(matches!(g.dequantize("nope"), Err(ModelError::Missing(_))));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let good = sample();
        for n in 0..good.len() {
            // Truncated anywhere: an error, or (in trailing data padding) a valid prefix.
            let _ = open(&good[..n]);
        }
        for i in 0..good.len().min(400) {
            for x in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= x;
                if let Ok(g) = open(&bad) {
                    for t in g.tensors.clone() {
                        let _ = g.dequantize(&t.name);
                    }
                }
            }
        }
        assert!(open(b"GGUF").is_err());
        assert!(open(b"NOPE\x03\0\0\0").is_err());
        let mut huge = sample();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(matches!(open(&huge), Err(ModelError::Gguf(_))));
    }
}
