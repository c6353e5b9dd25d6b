//! Local VIN files: one VIN per line, or CSV with a header, optionally gzip
//! or zstd compressed. Compression is detected from the first bytes, so a
//! misnamed file still reads.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::{InputRow, SourceError, TextEncoding};

/// How a file holds its VINs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFormat {
    /// One VIN per line; every line is a row (a blank one is an empty VIN).
    Lines,
    /// Delimited text with a header row; the VIN is in the named column.
    /// The delimiter is `,`, tab, `;` or `|`, read off the header line.
    Csv { column: String, carry: Vec<String> },
    /// Apache Parquet; the VIN column must hold strings.
    Parquet { column: String, carry: Vec<String> },
}

impl FileFormat {
    /// Parquet when the name says `.parquet`; CSV when a column is named or
    /// the name says `.csv` or `.tsv` (before any compression suffix); lines
    /// otherwise. Without a named column, CSV and Parquet read `vin`.
    pub fn infer(path: &Path, column: Option<&str>) -> FileFormat {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let stem = name.trim_end_matches(".gz").trim_end_matches(".zst").trim_end_matches(".zstd");
        let col = || column.unwrap_or("vin").to_string();
        if stem.ends_with(".parquet") || stem.ends_with(".pq") {
            FileFormat::Parquet { column: col(), carry: Vec::new() }
        } else if column.is_some() || stem.ends_with(".csv") || stem.ends_with(".tsv") {
            FileFormat::Csv { column: col(), carry: Vec::new() }
        } else {
            FileFormat::Lines
        }
    }

    /// The same format, carrying `carry` columns to the output.
    pub fn carrying(self, carry: &[String]) -> FileFormat {
        match self {
            FileFormat::Lines => FileFormat::Lines,
            FileFormat::Csv { column, .. } => FileFormat::Csv { column, carry: carry.to_vec() },
            FileFormat::Parquet { column, .. } => FileFormat::Parquet { column, carry: carry.to_vec() },
        }
    }
}

/// Compression detected from magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// gzip starts `1f 8b` (RFC 1952); a zstd frame starts `28 b5 2f fd` (RFC 8878).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Wraps a byte stream in the decoder its first bytes call for.
pub fn decompress<R: Read + 'static>(inner: R) -> std::io::Result<Box<dyn BufRead>> {
    // 256 KiB keeps syscalls rare on large files without holding much memory.
    let mut buffered = BufReader::with_capacity(256 * 1024, inner);
    let kind = Compression::sniff(buffered.fill_buf()?);
    Ok(match kind {
        Compression::None => Box::new(buffered),
        // Multi-member gzip (as `cat a.gz b.gz` makes) is read whole.
        Compression::Gzip => {
            Box::new(BufReader::with_capacity(256 * 1024, flate2::bufread::MultiGzDecoder::new(buffered)))
        }
        Compression::Zstd => {
            Box::new(BufReader::with_capacity(256 * 1024, zstd::stream::read::Decoder::with_buffer(buffered)?))
        }
    })
}

/// A local file, read as a stream of [`InputRow`]s.
pub struct FileSource {
    path: PathBuf,
    rows: Box<dyn Iterator<Item = Result<InputRow, SourceError>>>,
}

impl FileSource {
    pub fn open(path: &Path, format: FileFormat) -> Result<FileSource, SourceError> {
        FileSource::open_named(path, &path.display().to_string(), format)
    }

    /// Opens `path`, naming it `shown` in rows' errors (an S3 object read
    /// from a temporary file is named by its URL); text is strict UTF-8.
    pub fn open_named(path: &Path, shown: &str, format: FileFormat) -> Result<FileSource, SourceError> {
        FileSource::open_encoded(path, shown, format, TextEncoding::UTF8)
    }

    /// [`FileSource::open_named`], reading text in `encoding`.
    pub fn open_encoded(
        path: &Path,
        shown: &str,
        format: FileFormat,
        encoding: TextEncoding,
    ) -> Result<FileSource, SourceError> {
        let shown = shown.to_string();
        let file = File::open(path).map_err(|source| SourceError::Open { path: shown.clone(), source })?;
        let rows: Box<dyn Iterator<Item = _>> = match format {
            FileFormat::Parquet { column, carry } => Box::new(super::parquet::rows(shown, file, &column, &carry)?),
            format => {
                let reader = decompress(file).map_err(|source| SourceError::Open { path: shown.clone(), source })?;
                match format {
                    FileFormat::Csv { column, carry } => Box::new(csv_rows(shown, reader, &column, &carry, encoding)?),
                    _ => Box::new(LineRows { path: shown, reader, row: 0, buf: Vec::new(), encoding }),
                }
            }
        };
        Ok(FileSource { path: path.to_path_buf(), rows })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for FileSource {
    type Item = Result<InputRow, SourceError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rows.next()
    }
}

struct LineRows {
    path: String,
    reader: Box<dyn BufRead>,
    row: u64,
    buf: Vec<u8>,
    encoding: TextEncoding,
}

impl Iterator for LineRows {
    type Item = Result<InputRow, SourceError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => None,
            Ok(_) => {
                self.row += 1;
                let line = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                Some(self.encoding.decode(line, &self.path, self.row).map(|vin| InputRow {
                    row: self.row,
                    vin,
                    carried: Vec::new(),
                    problem: None,
                }))
            }
            Err(source) => Some(Err(SourceError::Read { path: self.path.clone(), row: self.row, source })),
        }
    }
}

fn csv_rows(
    path: String,
    reader: Box<dyn BufRead>,
    column: &str,
    carry: &[String],
    encoding: TextEncoding,
) -> Result<impl Iterator<Item = Result<InputRow, SourceError>> + use<>, SourceError> {
    let mut reader = reader;
    let head = reader.fill_buf().map_err(|source| SourceError::Read { path: path.clone(), row: 0, source })?;
    let delimiter = sniff_delimiter(head);
    let mut csv = csv::ReaderBuilder::new().flexible(true).delimiter(delimiter).from_reader(reader);
    let header: Vec<String> = csv
        .byte_headers()
        .map_err(|e| csv_error(&path, 0, e))?
        .iter()
        .map(|h| encoding.decode(h, &path, 0))
        .collect::<Result<_, _>>()?;
    let find = |name: &str| {
        let wanted = name.trim().to_lowercase();
        header
            .iter()
            .position(|h| h.trim().trim_start_matches('\u{feff}').to_lowercase() == wanted)
            .ok_or_else(|| SourceError::missing_column(&path, name, header.iter().map(String::as_str)))
    };
    let index = find(column)?;
    let carried: Vec<usize> = carry.iter().map(|c| find(c)).collect::<Result<_, _>>()?;
    let mut row = 0u64;
    let mut record = csv::ByteRecord::new();
    Ok(std::iter::from_fn(move || match csv.read_byte_record(&mut record) {
        Ok(false) => None,
        Ok(true) => {
            row += 1;
            // A short record has no VIN cell: an empty VIN, rejected as such.
            let cell = |i: usize| record.get(i).map(|v| encoding.decode(v, &path, row)).transpose();
            let read = || -> Result<InputRow, SourceError> {
                let vin = cell(index)?.unwrap_or_default();
                // A short record carries nulls, never values from another column.
                let carried = carried
                    .iter()
                    .map(|&i| Ok(cell(i)?.map(serde_json::Value::String).unwrap_or_default()))
                    .collect::<Result<_, SourceError>>()?;
                // A record whose fields do not line up with the header (a
                // stray delimiter, a lost quote) may hold any cell under the
                // VIN's name: it becomes an error row, not a guess.
                let problem = (record.len() != header.len()).then(|| {
                    let n = record.len();
                    let mut p =
                        format!("{n} field{} where the header has {}", if n == 1 { "" } else { "s" }, header.len());
                    // A quote that never closes swallows the lines after it.
                    let lines = record.iter().map(|f| f.iter().filter(|&&b| b == b'\n').count()).sum::<usize>();
                    if lines > 0 {
                        p.push_str(&format!(" (a quoted field runs over {} lines: is a quote left open?)", lines + 1));
                    }
                    p
                });
                Ok(InputRow { row, vin, carried, problem })
            };
            Some(read())
        }
        Err(e) => Some(Err(csv_error(&path, row + 1, e))),
    }))
}

/// The delimiter that occurs most in the header line; `,` on a tie.
fn sniff_delimiter(head: &[u8]) -> u8 {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    [b',', b'\t', b';', b'|']
        .into_iter()
        .map(|d| (line.iter().filter(|&&b| b == d).count(), d))
        .fold((0, b','), |best, cur| if cur.0 > best.0 { cur } else { best })
        .1
}

fn csv_error(path: &str, row: u64, e: csv::Error) -> SourceError {
    match e.into_kind() {
        csv::ErrorKind::Io(source) => SourceError::Read { path: path.to_string(), row, source },
        other => SourceError::Csv { path: path.to_string(), row, message: format!("{other:?}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn rows(path: &Path, format: FileFormat) -> Vec<InputRow> {
        FileSource::open(path, format).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn reads_lines_gzip_and_zstd_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"1HGCM82633A004352\r\n\nJM3KE4BY6G06\n";
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, text).unwrap();
        // Compressed files with misleading names.
        let gz = dir.path().join("b.txt");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(text).unwrap();
        enc.finish().unwrap();
        let zst = dir.path().join("c.gz");
        std::fs::write(&zst, zstd::encode_all(&text[..], 3).unwrap()).unwrap();
        for p in [&plain, &gz, &zst] {
            let got = rows(p, FileFormat::Lines);
            let vins: Vec<_> = got.iter().map(|r| r.vin.as_str()).collect();
            assert_eq!(vins, ["1HGCM82633A004352", "", "JM3KE4BY6G06"], "{}", p.display());
            assert_eq!(got[2].row, 3);
        }
    }

    #[test]
    fn csv_finds_the_column_case_insensitively_and_counts_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleet.csv");
        std::fs::write(&p, "\u{feff}unit,VIN,note\n7,1HGCM82633A004352,\"two\nlines\"\n8\n9,JM3KE4BY6G06,x\n").unwrap();
        let got = rows(&p, FileFormat::infer(&p, None));
        let vins: Vec<_> = got.iter().map(|r| (r.row, r.vin.as_str())).collect();
        assert_eq!(vins, [(1, "1HGCM82633A004352"), (2, ""), (3, "JM3KE4BY6G06")]);
    }

    #[test]
    fn tab_and_semicolon_delimiters_are_read_off_the_header() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in
            [("a.tsv", "vin\tmake\n1HGCM82633A004352\tHonda\n"), ("b.txt", "id;vin\n1;1HGCM82633A004352\n")]
        {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            let got = rows(&p, FileFormat::Csv { column: "vin".into(), carry: vec![] });
            assert_eq!(
                got,
                [InputRow { row: 1, vin: "1HGCM82633A004352".into(), carried: vec![], problem: None }],
                "{name}"
            );
        }
    }

    #[test]
    fn carried_columns_come_along_and_a_short_record_carries_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleet.csv");
        std::fs::write(&p, "unit,vin,depot\nU1,1HGCM82633A004352,Reno\nU2\n").unwrap();
        let got = rows(&p, FileFormat::Csv { column: "vin".into(), carry: vec!["depot".into(), "unit".into()] });
        assert_eq!(got[0].carried, [serde_json::json!("Reno"), serde_json::json!("U1")]);
        assert_eq!(got[1].carried, [serde_json::Value::Null, serde_json::json!("U2")]);
        let err = FileSource::open(&p, FileFormat::Csv { column: "vin".into(), carry: vec!["colour".into()] });
        assert!(err.err().unwrap().to_string().contains("\"colour\""));
    }

    #[test]
    fn a_missing_csv_column_names_the_file_and_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleet.csv");
        std::fs::write(&p, "unit,chassis\n1,2\n").unwrap();
        let err =
            FileSource::open(&p, FileFormat::Csv { column: "vin".into(), carry: vec![] }).err().unwrap().to_string();
        assert!(err.contains("fleet.csv") && err.contains("\"vin\"") && err.contains(r#""unit", "chassis""#), "{err}");
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_naming_file_and_row_unless_an_encoding_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("legacy.csv");
        std::fs::write(&p, b"vin,city\n1HGCM82633A004352,Berlin\n5YJSA1DG9DFP14705,K\xf6ln\n").unwrap();
        let format = FileFormat::Csv { column: "vin".into(), carry: vec!["city".into()] };
        let got: Vec<_> = FileSource::open(&p, format.clone()).unwrap().collect();
        assert!(got[0].is_ok());
        let msg = got[1].as_ref().unwrap_err().to_string();
        assert!(msg.contains("legacy.csv row 2") && msg.contains("0xf6") && msg.contains("latin1"), "{msg}");
        let latin1 = TextEncoding::from_label("latin1").unwrap();
        let rows: Vec<_> =
            FileSource::open_encoded(&p, "legacy.csv", format, latin1).unwrap().map(Result::unwrap).collect();
        assert_eq!(rows[1].carried, [serde_json::json!("Köln")]);
        assert_eq!(TextEncoding::from_label("utf-8"), Some(TextEncoding::UTF8));
        assert_eq!(TextEncoding::from_label("klingon"), None);
    }

    #[test]
    fn a_truncated_gzip_fails_naming_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cut.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for _ in 0..10_000 {
            enc.write_all(b"1HGCM82633A004352\n").unwrap();
        }
        let bytes = enc.finish().unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let err = FileSource::open(&p, FileFormat::Lines).unwrap().find_map(Result::err).expect("an error");
        let msg = err.to_string();
        assert!(msg.contains("cut.txt.gz") && msg.contains("after row"), "{msg}");
    }
}
