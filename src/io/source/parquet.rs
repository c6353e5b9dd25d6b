//! Parquet input: the VIN column (strings) and carried columns with their
//! types, read one record batch at a time.

use std::fs::File;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type};
use arrow::datatypes::{UInt8Type, UInt16Type, UInt32Type, UInt64Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde_json::Value;

use super::{InputRow, SourceError};

/// Rows per record batch: large enough to amortise decoding, small enough
/// that memory stays flat (a few MB) whatever the file size.
const BATCH_ROWS: usize = 8192;

pub fn rows(
    path: String,
    file: File,
    column: &str,
    carry: &[String],
) -> Result<impl Iterator<Item = Result<InputRow, SourceError>> + use<>, SourceError> {
    let err = |e: parquet::errors::ParquetError| SourceError::Parquet { path: path.clone(), message: e.to_string() };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(err)?;
    let schema = Arc::clone(builder.schema());
    let find =
        |name: &str| {
            schema.fields().iter().position(|f| f.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
                SourceError::missing_column(&path, name, schema.fields().iter().map(|f| f.name().as_str()))
            })
        };
    let vin_index = find(column)?;
    let vin_type = schema.field(vin_index).data_type();
    if !matches!(vin_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
        return Err(SourceError::NotText { path, column: column.to_string(), found: vin_type.to_string() });
    }
    let carried: Vec<usize> = carry.iter().map(|c| find(c)).collect::<Result<_, _>>()?;
    let reader = builder.with_batch_size(BATCH_ROWS).build().map_err(err)?;
    Ok(ParquetRows { path, reader, batch: None, next: 0, row: 0, vin_index, carried })
}

struct ParquetRows {
    path: String,
    reader: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    next: usize,
    row: u64,
    vin_index: usize,
    carried: Vec<usize>,
}

impl Iterator for ParquetRows {
    type Item = Result<InputRow, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(batch) = &self.batch
                && self.next < batch.num_rows()
            {
                let i = self.next;
                self.next += 1;
                self.row += 1;
                let vin = text(batch.column(self.vin_index), i).unwrap_or_default();
                let carried = self.carried.iter().map(|&c| json_value(batch.column(c), i)).collect();
                return Some(Ok(InputRow { row: self.row, vin, carried, problem: None }));
            }
            match self.reader.next()? {
                Ok(b) => {
                    self.batch = Some(b);
                    self.next = 0;
                }
                Err(e) => {
                    return Some(Err(SourceError::Parquet {
                        path: self.path.clone(),
                        message: format!("after row {}: {e}", self.row),
                    }));
                }
            }
        }
    }
}

fn text(array: &ArrayRef, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(i).to_string()),
        _ => None,
    }
}

/// A cell as JSON, keeping numbers and booleans typed; anything else
/// (dates, timestamps, decimals) as Arrow's canonical text.
pub fn json_value(array: &ArrayRef, i: usize) -> Value {
    if array.is_null(i) {
        return Value::Null;
    }
    macro_rules! num {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => num!(Float32Type),
        DataType::Float64 => num!(Float64Type),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            text(array, i).map(Value::String).unwrap_or_default()
        }
        _ => ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default())
            .map(|f| Value::String(f.value(i).to_string()))
            .unwrap_or(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use parquet::arrow::ArrowWriter;

    #[test]
    fn reads_the_vin_and_typed_carried_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleet.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("unit", DataType::Int64, false),
            Field::new("VIN", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![7, 8])),
                Arc::new(StringArray::from(vec![Some("1HGCM82633A004352"), None])),
            ],
        )
        .unwrap();
        let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let got: Vec<InputRow> = rows("fleet.parquet".into(), File::open(&p).unwrap(), "vin", &["unit".into()])
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got[0],
            InputRow { row: 1, vin: "1HGCM82633A004352".into(), carried: vec![Value::from(7)], problem: None }
        );
        assert_eq!(got[1], InputRow { row: 2, vin: String::new(), carried: vec![Value::from(8)], problem: None });
        let err = rows("fleet.parquet".into(), File::open(&p).unwrap(), "unit", &[]).err().unwrap().to_string();
        assert!(err.contains("must hold text"), "{err}");
    }
}
