//! A small ONNX graph builder: typed inputs and outputs, nodes with attributes, constants,
//! and weights streamed into an external-data file at 4096-byte aligned offsets (so ONNX
//! Runtime can memory-map them and the `.onnx` file stays far below protobuf's 2 GiB limit).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::proto::{self, attribute_type, data_type, AttributeProto, NodeProto, TensorProto};
use crate::{Error, Result};

/// Alignment of every tensor in the external-data file (ONNX's ExternalData.md: a multiple of
/// the page size, for mmap).
pub const ALIGN: u64 = 4096;
/// Tensors smaller than this stay inside the `.onnx` file.
const INLINE_MAX: usize = 1024;

/// An element type of a graph value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    F64,
    I64,
    Bool,
    I8,
    U8,
}

impl Elem {
    pub fn onnx(self) -> i32 {
        match self {
            Elem::F32 => data_type::FLOAT,
            Elem::F16 => data_type::FLOAT16,
            Elem::F64 => data_type::DOUBLE,
            Elem::I64 => data_type::INT64,
            Elem::Bool => data_type::BOOL,
            Elem::I8 => data_type::INT8,
            Elem::U8 => data_type::UINT8,
        }
    }
    /// The name used in `export.json` (numpy's).
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F16 => "float16",
            Elem::F64 => "float64",
            Elem::I64 => "int64",
            Elem::Bool => "bool",
            Elem::I8 => "int8",
            Elem::U8 => "uint8",
        }
    }
}

/// A node attribute.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(&'static str),
}

fn attr(name: &str, a: Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: name.into(),
        ..Default::default()
    };
    match a {
        Attr::Int(i) => (p.r#type, p.i) = (attribute_type::INT, i),
        Attr::Float(f) => (p.r#type, p.f) = (attribute_type::FLOAT, f),
        Attr::Ints(v) => (p.r#type, p.ints) = (attribute_type::INTS, v),
        Attr::Str(s) => (p.r#type, p.s) = (attribute_type::STRING, s.as_bytes().to_vec()),
    }
    p
}

/// One input or output of a graph as `export.json` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ValueSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

fn value_info(name: &str, elem: Elem, dims: &[i64]) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension, Dimension};
    proto::ValueInfoProto {
        name: name.into(),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: elem.onnx(),
                    shape: Some(proto::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(dimension::Value::DimValue(d)),
                            })
                            .collect(),
                    }),
                },
            )),
        }),
        doc_string: String::new(),
    }
}

/// The external-data file of one graph.
struct ExternalData {
    location: String,
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
}

impl ExternalData {
    fn create(path: PathBuf) -> Result<Self> {
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            location: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
            out: BufWriter::with_capacity(1 << 20, f),
            offset: 0,
        })
    }

    /// Appends `bytes` at the next aligned offset; returns the offset.
    fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let pad = (ALIGN - self.offset % ALIGN) % ALIGN;
        let io = |e| Error::io(&self.path, e);
        self.out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        let at = self.offset + pad;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.offset = at + bytes.len() as u64;
        Ok(at)
    }
}

/// Little-endian bytes of a tensor's values in `elem` (float32 or float16).
fn tensor_bytes(t: &Tensor, elem: Elem) -> Result<Vec<u8>> {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let flat = t.view(-1);
    Ok(match elem {
        Elem::F32 | Elem::F16 => {
            let v: Vec<f32> = Vec::try_from(flat.to_kind(Kind::Float))?;
            if elem == Elem::F32 {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                v.iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect()
            }
        }
        Elem::F64 => {
            let v: Vec<f64> = Vec::try_from(flat.to_kind(Kind::Double))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        Elem::I64 => {
            let v: Vec<i64> = Vec::try_from(flat.to_kind(Kind::Int64))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        Elem::Bool => {
            let v: Vec<i64> = Vec::try_from(flat.to_kind(Kind::Int64))?;
            v.iter().map(|&x| u8::from(x != 0)).collect()
        }
        Elem::I8 | Elem::U8 => {
            let v: Vec<i64> = Vec::try_from(flat.to_kind(Kind::Int64))?;
            v.iter().map(|&x| x as u8).collect()
        }
    })
}

/// A graph under construction. Values are named by strings; every helper returns the name of
/// the value it makes.
pub struct Graph {
    name: String,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    init_names: HashSet<String>,
    inputs: Vec<proto::ValueInfoProto>,
    outputs: Vec<proto::ValueInfoProto>,
    pub input_specs: Vec<ValueSpec>,
    pub output_specs: Vec<ValueSpec>,
    data: ExternalData,
    next: usize,
}

/// What [`Graph::finish`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub onnx: PathBuf,
    pub data: PathBuf,
    pub nodes: usize,
    pub initializers: usize,
}

impl Graph {
    /// A graph whose weights go to `<dir>/<name>.onnx.data`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            nodes: Vec::new(),
            inits: Vec::new(),
            init_names: HashSet::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            input_specs: Vec::new(),
            output_specs: Vec::new(),
            data: ExternalData::create(dir.join(format!("{name}.onnx.data")))?,
            next: 0,
        })
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    /// A graph input.
    pub fn input(&mut self, name: &str, elem: Elem, dims: &[i64]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        self.input_specs.push(ValueSpec {
            name: name.into(),
            dtype: elem.name().into(),
            shape: dims.to_vec(),
        });
        name.into()
    }

    /// Publishes value `v` as the graph output `name`.
    pub fn output(&mut self, v: &str, name: &str, elem: Elem, dims: &[i64]) {
        if v != name {
            self.nodes.push(NodeProto {
                input: vec![v.into()],
                output: vec![name.into()],
                op_type: "Identity".into(),
                ..Default::default()
            });
        }
        self.outputs.push(value_info(name, elem, dims));
        self.output_specs.push(ValueSpec {
            name: name.into(),
            dtype: elem.name().into(),
            shape: dims.to_vec(),
        });
    }

    /// A node with one output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute: attrs.into_iter().map(|(n, a)| attr(n, a)).collect(),
            ..Default::default()
        });
        out
    }

    /// A node with `n` outputs.
    pub fn op_n(&mut self, op: &str, inputs: &[&str], n: usize) -> Vec<String> {
        let base = self.fresh(op);
        let outs: Vec<String> = (0..n).map(|i| format!("{base}_{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name: base,
            op_type: op.into(),
            ..Default::default()
        });
        outs
    }

    /// An initializer named `name` holding `t` as `elem`; written once however often asked.
    pub fn tensor(&mut self, name: &str, t: &Tensor, elem: Elem) -> Result<String> {
        if self.init_names.contains(name) {
            return Ok(name.into());
        }
        let bytes = tensor_bytes(t, elem)?;
        let mut p = TensorProto {
            dims: t.size(),
            data_type: elem.onnx(),
            name: name.into(),
            ..Default::default()
        };
        if bytes.len() < INLINE_MAX {
            p.raw_data = bytes;
        } else {
            let at = self.data.append(&bytes)?;
            p.data_location = proto::DATA_LOCATION_EXTERNAL;
            let kv = |k: &str, v: String| proto::StringStringEntryProto {
                key: k.into(),
                value: v,
            };
            p.external_data = vec![
                kv("location", self.data.location.clone()),
                kv("offset", at.to_string()),
                kv("length", bytes.len().to_string()),
            ];
        }
        self.inits.push(p);
        self.init_names.insert(name.into());
        Ok(name.into())
    }

    /// An anonymous constant.
    pub fn constant(&mut self, t: &Tensor, elem: Elem) -> Result<String> {
        let name = self.fresh("const");
        self.tensor(&name, t, elem)
    }

    pub fn const_i64(&mut self, v: &[i64]) -> Result<String> {
        self.constant(&Tensor::from_slice(v), Elem::I64)
    }

    /// A float32 scalar (shape []), for broadcasting.
    pub fn scalar(&mut self, v: f32) -> Result<String> {
        self.constant(&Tensor::from(v), Elem::F32)
    }

    // Element-wise and shape helpers, named after their ONNX ops.

    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &str, b: &str) -> String {
        self.op("Div", &[a, b], vec![])
    }
    pub fn matmul(&mut self, a: &str, b: &str) -> String {
        self.op("MatMul", &[a, b], vec![])
    }
    pub fn cast(&mut self, x: &str, to: Elem) -> String {
        self.op("Cast", &[x], vec![("to", Attr::Int(to.onnx() as i64))])
    }
    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> Result<String> {
        let s = self.const_i64(shape)?;
        Ok(self.op("Reshape", &[x, &s], vec![]))
    }
    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }
    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> Result<String> {
        let a = self.const_i64(axes)?;
        Ok(self.op("Unsqueeze", &[x, &a], vec![]))
    }
    pub fn expand(&mut self, x: &str, shape: &[i64]) -> Result<String> {
        let s = self.const_i64(shape)?;
        Ok(self.op("Expand", &[x, &s], vec![]))
    }
    pub fn concat(&mut self, xs: &[&str], axis: i64) -> String {
        self.op("Concat", xs, vec![("axis", Attr::Int(axis))])
    }
    /// `x[..., start:end, ...]` along `axis`.
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> Result<String> {
        let s = self.const_i64(&[start])?;
        let e = self.const_i64(&[end])?;
        let a = self.const_i64(&[axis])?;
        Ok(self.op("Slice", &[x, &s, &e, &a], vec![]))
    }

    /// Writes `<dir>/<name>.onnx` (opset `opset`, IR version 8) and closes the data file.
    pub fn finish(mut self, dir: &Path, opset: i64, doc: &str) -> Result<Written> {
        self.data
            .out
            .flush()
            .map_err(|e| Error::io(&self.data.path, e))?;
        let model = proto::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![proto::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "zk0-train".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(proto::GraphProto {
                node: std::mem::take(&mut self.nodes),
                name: self.name.clone(),
                initializer: std::mem::take(&mut self.inits),
                input: std::mem::take(&mut self.inputs),
                output: std::mem::take(&mut self.outputs),
                ..Default::default()
            }),
            ..Default::default()
        };
        let path = dir.join(format!("{}.onnx", self.name));
        let g = model
            .graph
            .as_ref()
            .map_or((0, 0), |g| (g.node.len(), g.initializer.len()));
        std::fs::write(&path, model.encode_to_vec()).map_err(|e| Error::io(&path, e))?;
        Ok(Written {
            onnx: path,
            data: self.data.path.clone(),
            nodes: g.0,
            initializers: g.1,
        })
    }
}

/// IR version 8 (ONNX 1.10+): what every ONNX Runtime since 1.10 and TensorRT 8.x read.
pub const IR_VERSION: i64 = 8;

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large tensors go to the data file at 4096-aligned offsets, small ones stay inline, a
    /// name is written once, and the file decodes back to what was built.
    #[test]
    fn external_data_is_aligned_and_the_model_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Graph::new(dir.path(), "t").unwrap();
        let x = g.input("x", Elem::F32, &[1, 3]);
        let big = Tensor::arange(3 * 1000, (Kind::Float, tch::Device::Cpu)).view([3, 1000]);
        let w = g.tensor("w", &big, Elem::F32).unwrap();
        assert_eq!(g.tensor("w", &big, Elem::F32).unwrap(), w);
        let w2 = g.tensor("w2", &big.narrow(1, 0, 500), Elem::F16).unwrap();
        let y = g.matmul(&x, &w);
        let s = g.scalar(2.0).unwrap();
        let y = g.mul(&y, &s);
        g.output(&y, "y", Elem::F32, &[1, 1000]);
        let _ = w2;
        let written = g.finish(dir.path(), 17, "test").unwrap();
        let bytes = std::fs::read(&written.onnx).unwrap();
        let m = proto::ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!((m.ir_version, m.opset_import[0].version), (IR_VERSION, 17));
        let graph = m.graph.unwrap();
        assert_eq!(graph.initializer.len(), 3, "w, w2 and the scalar");
        let data_len = std::fs::metadata(&written.data).unwrap().len();
        for t in &graph.initializer {
            let ext: std::collections::HashMap<_, _> = t
                .external_data
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect();
            match t.name.as_str() {
                "w" | "w2" => {
                    assert_eq!(t.data_location, proto::DATA_LOCATION_EXTERNAL);
                    let off: u64 = ext["offset"].parse().unwrap();
                    let len: u64 = ext["length"].parse().unwrap();
                    assert_eq!(off % ALIGN, 0, "{} at {off}", t.name);
                    assert!(off + len <= data_len);
                    assert_eq!(ext["location"], "t.onnx.data");
                    let el = if t.name == "w" { 4 } else { 2 };
                    assert_eq!(len, t.dims.iter().product::<i64>() as u64 * el);
                }
                _ => {
                    assert!(t.external_data.is_empty());
                    assert_eq!(t.raw_data, 2.0f32.to_le_bytes());
                }
            }
        }
        // The second tensor starts on the first page boundary after the first.
        let data = std::fs::read(&written.data).unwrap();
        assert_eq!(&data[4..8], &1.0f32.to_le_bytes());
        assert_eq!(graph.output[0].name, "y");
    }
}
