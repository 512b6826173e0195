//! Parquet files as arrow tables, and cell extraction.
//!
//! Files are read whole into one `RecordBatch` (datasets keep frames small; pixels live in mp4s).
//! Cells are addressed by column name, never position: LeRobot's writers disagree on column order,
//! and on whether vectors are `fixed_size_list` (recorder) or `list` (v2.1→v3.0 converter).

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{inconsistent, io_err, DatasetError, Result};

/// Reads every row group of a parquet file into a single batch.
pub fn read_parquet(path: &Path) -> Result<RecordBatch> {
    let pq_err = |e: &dyn std::fmt::Display| DatasetError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(io_err(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| pq_err(&e))?;
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| pq_err(&e))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pq_err(&e))?;
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| pq_err(&e))
}

/// A column by name, or an error naming the file.
pub fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| inconsistent(path, format!("missing column {name:?}")))
}

/// The values of one feature in one row, flattened (a scalar column gives a one-element vector).
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureValue {
    /// float32 / float64 columns (float32 widened exactly).
    Float(Vec<f64>),
    /// Any integer column.
    Int(Vec<i64>),
    Bool(Vec<bool>),
    Text(String),
}

impl FeatureValue {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FeatureValue::Float(v) => v.len(),
            FeatureValue::Int(v) => v.len(),
            FeatureValue::Bool(v) => v.len(),
            FeatureValue::Text(_) => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Numeric view for training (bools are 0/1, text is empty).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            FeatureValue::Float(v) => v.iter().map(|&x| x as f32).collect(),
            FeatureValue::Int(v) => v.iter().map(|&x| x as f32).collect(),
            FeatureValue::Bool(v) => v.iter().map(|&x| f32::from(u8::from(x))).collect(),
            FeatureValue::Text(_) => Vec::new(),
        }
    }

    /// Numeric view in f64 (used by statistics).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            FeatureValue::Float(v) => v.clone(),
            FeatureValue::Int(v) => v.iter().map(|&x| x as f64).collect(),
            FeatureValue::Bool(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
            FeatureValue::Text(_) => Vec::new(),
        }
    }

    /// JSON list of the values (`show --json` prints every feature as a list).
    pub fn to_json_list(&self) -> serde_json::Value {
        match self {
            FeatureValue::Float(v) => serde_json::json!(v),
            FeatureValue::Int(v) => serde_json::json!(v),
            FeatureValue::Bool(v) => serde_json::json!(v),
            FeatureValue::Text(s) => serde_json::json!([s]),
        }
    }
}

/// Flattens the cell at `row` (scalar, list, fixed-size list, nested lists) into a value.
pub fn cell_value(array: &dyn Array, row: usize) -> Option<FeatureValue> {
    let mut out = None;
    flatten_into(array, row, 1, &mut out)?;
    out
}

/// Appends `len` consecutive elements starting at `offset` of `array` (recursing through lists).
fn flatten_into(
    array: &dyn Array,
    offset: usize,
    len: usize,
    out: &mut Option<FeatureValue>,
) -> Option<()> {
    if offset + len > array.len() {
        return None;
    }
    macro_rules! ints {
        ($t:ty) => {{
            let a = array.as_primitive::<$t>();
            let v = (offset..offset + len).map(|i| a.value(i) as i64);
            match out.get_or_insert_with(|| FeatureValue::Int(Vec::new())) {
                FeatureValue::Int(dst) => dst.extend(v),
                _ => return None,
            }
        }};
    }
    match array.data_type() {
        DataType::Float32 | DataType::Float64 => {
            let v: Vec<f64> = if let DataType::Float32 = array.data_type() {
                let a = array.as_primitive::<Float32Type>();
                (offset..offset + len)
                    .map(|i| f64::from(a.value(i)))
                    .collect()
            } else {
                let a = array.as_primitive::<Float64Type>();
                (offset..offset + len).map(|i| a.value(i)).collect()
            };
            match out.get_or_insert_with(|| FeatureValue::Float(Vec::new())) {
                FeatureValue::Float(dst) => dst.extend(v),
                _ => return None,
            }
        }
        DataType::Int8 => ints!(Int8Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int64 => ints!(Int64Type),
        DataType::UInt8 => ints!(UInt8Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt32 => ints!(UInt32Type),
        DataType::UInt64 => ints!(UInt64Type),
        DataType::Boolean => {
            let a = array.as_boolean();
            let v = (offset..offset + len).map(|i| a.value(i));
            match out.get_or_insert_with(|| FeatureValue::Bool(Vec::new())) {
                FeatureValue::Bool(dst) => dst.extend(v),
                _ => return None,
            }
        }
        DataType::Utf8 if len == 1 => {
            *out = Some(FeatureValue::Text(
                array.as_string::<i32>().value(offset).to_string(),
            ))
        }
        DataType::LargeUtf8 if len == 1 => {
            *out = Some(FeatureValue::Text(
                array.as_string::<i64>().value(offset).to_string(),
            ))
        }
        DataType::List(_) => {
            let a = array.as_list::<i32>();
            for i in offset..offset + len {
                let (s, e) = (
                    a.value_offsets()[i] as usize,
                    a.value_offsets()[i + 1] as usize,
                );
                flatten_into(a.values().as_ref(), s, e - s, out)?;
            }
        }
        DataType::LargeList(_) => {
            let a = array.as_list::<i64>();
            for i in offset..offset + len {
                let (s, e) = (
                    a.value_offsets()[i] as usize,
                    a.value_offsets()[i + 1] as usize,
                );
                flatten_into(a.values().as_ref(), s, e - s, out)?;
            }
        }
        DataType::FixedSizeList(_, n) => {
            let a = array.as_fixed_size_list();
            let n = *n as usize;
            flatten_into(a.values().as_ref(), offset * n, len * n, out)?;
        }
        _ => return None,
    }
    Some(())
}

/// The cell as JSON, keeping list nesting (for stats columns such as `[[[r]], [[g]], [[b]]]`).
pub fn cell_json(array: &dyn Array, row: usize) -> serde_json::Value {
    use serde_json::Value;
    if array.is_null(row) {
        return Value::Null;
    }
    let list = |values: &ArrayRef, s: usize, e: usize| {
        Value::Array((s..e).map(|i| cell_json(values.as_ref(), i)).collect())
    };
    match array.data_type() {
        DataType::List(_) => {
            let a = array.as_list::<i32>();
            list(
                a.values(),
                a.value_offsets()[row] as usize,
                a.value_offsets()[row + 1] as usize,
            )
        }
        DataType::LargeList(_) => {
            let a = array.as_list::<i64>();
            list(
                a.values(),
                a.value_offsets()[row] as usize,
                a.value_offsets()[row + 1] as usize,
            )
        }
        DataType::FixedSizeList(_, n) => {
            let n = *n as usize;
            list(array.as_fixed_size_list().values(), row * n, row * n + n)
        }
        _ => match cell_value(array, row) {
            Some(FeatureValue::Float(v)) => serde_json::json!(v[0]),
            Some(FeatureValue::Int(v)) => serde_json::json!(v[0]),
            Some(FeatureValue::Bool(v)) => serde_json::json!(v[0]),
            Some(FeatureValue::Text(s)) => Value::String(s),
            None => Value::Null,
        },
    }
}

/// An integer cell (episode and index columns), or an error naming file and column.
pub fn int_cell(batch: &RecordBatch, name: &str, row: usize, path: &Path) -> Result<i64> {
    match cell_value(column(batch, name, path)?.as_ref(), row) {
        Some(FeatureValue::Int(v)) if v.len() == 1 => Ok(v[0]),
        _ => Err(inconsistent(
            path,
            format!("column {name:?} row {row}: expected an integer"),
        )),
    }
}

/// A float cell (`from_timestamp`, `timestamp`).
pub fn float_cell(batch: &RecordBatch, name: &str, row: usize, path: &Path) -> Result<f64> {
    match cell_value(column(batch, name, path)?.as_ref(), row) {
        Some(FeatureValue::Float(v)) if v.len() == 1 => Ok(v[0]),
        Some(FeatureValue::Int(v)) if v.len() == 1 => Ok(v[0] as f64),
        _ => Err(inconsistent(
            path,
            format!("column {name:?} row {row}: expected a number"),
        )),
    }
}

/// The PNG (or other encoded image) bytes of an `image` feature cell: `struct<bytes, path>`.
pub fn image_bytes(array: &dyn Array, row: usize) -> Option<&[u8]> {
    let s = array.as_struct_opt()?;
    let bytes = s.column_by_name("bytes")?;
    if bytes.is_null(row) {
        return None;
    }
    match bytes.data_type() {
        DataType::Binary => Some(bytes.as_binary::<i32>().value(row)),
        DataType::LargeBinary => Some(bytes.as_binary::<i64>().value(row)),
        DataType::BinaryView => Some(bytes.as_binary_view().value(row)),
        _ => None,
    }
}
