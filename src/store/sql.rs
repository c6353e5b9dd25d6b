//! What both dialects speak: the values a statement binds ([`Arg`]), the
//! rows it returns ([`Row`]), and the marks in shared SQL text that each
//! dialect renders its own way ([`render`]).
//!
//! Why not sqlx's `Any` driver: in sqlx 0.9 it has no arrays, JSON or
//! timestamps, which every statement here needs. This is the small part of
//! it vinetl uses, with those three: an array is a Postgres array or a JSON
//! array in SQLite, JSON is `jsonb` or JSON text, a time is `timestamptz`
//! or Unix seconds; rows come back with times as Unix seconds either way.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use super::records::StoreError;

/// A value bound to a statement. A SQL null keeps its type (Postgres
/// refuses a text null for an integer column).
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Bool(Option<bool>),
    /// `jsonb` on Postgres, JSON text on SQLite.
    Json(Value),
    /// `text[]` on Postgres, a JSON array on SQLite.
    Texts(Option<Vec<String>>),
}

macro_rules! arg_from {
    ($($t:ty => $v:ident($conv:expr)),* $(,)?) => {
        $(
            impl From<$t> for Arg {
                fn from(x: $t) -> Arg {
                    Arg::$v(Some($conv(x)))
                }
            }
            impl From<Option<$t>> for Arg {
                fn from(x: Option<$t>) -> Arg {
                    Arg::$v(x.map($conv))
                }
            }
        )*
    };
}

arg_from!(
    i64 => Int(|x| x),
    i32 => Int(i64::from),
    u32 => Int(i64::from),
    f64 => Real(|x| x),
    bool => Bool(|x| x),
    String => Text(|x| x),
    &str => Text(str::to_string),
    &String => Text(String::clone),
    Vec<String> => Texts(|x| x),
    &[String] => Texts(<[String]>::to_vec),
);

impl From<Value> for Arg {
    fn from(x: Value) -> Arg {
        Arg::Json(x)
    }
}

impl From<&Value> for Arg {
    fn from(x: &Value) -> Arg {
        Arg::Json(x.clone())
    }
}

/// `args![a, b, c]`: a statement's binds, in order.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$($crate::store::sql::Arg::from($a)),*][..] };
}
pub(crate) use args;

/// Binds `args` in order to a query of either dialect; each dialect says
/// how JSON (`json`) and arrays (`texts`) travel.
macro_rules! bind_args {
    ($q:expr, $args:expr, json: $json:expr, texts: $texts:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::Int(n) => q.bind(*n),
                Arg::Real(r) => q.bind(*r),
                Arg::Text(t) => q.bind(t.clone()),
                Arg::Bool(b) => q.bind(*b),
                Arg::Json(v) => q.bind($json(v)),
                Arg::Texts(t) => q.bind($texts(t)),
            };
        }
        q
    }};
}
pub(crate) use bind_args;

/// A dialect's two ways to run a statement, over its own `bind` and
/// `row`: `exec` (rows affected) and `rows` (all of them).
macro_rules! runners {
    ($executor:ident) => {
        pub(super) async fn exec<'e>(
            e: impl sqlx::$executor<'e>,
            sql: &'static str,
            args: &[Arg],
        ) -> Result<u64, StoreError> {
            Ok(bind(sqlx::query(sqlx::AssertSqlSafe(sql)), args).execute(e).await?.rows_affected())
        }

        pub(super) async fn rows<'e>(
            e: impl sqlx::$executor<'e>,
            sql: &'static str,
            args: &[Arg],
        ) -> Result<Vec<Row>, StoreError> {
            bind(sqlx::query(sqlx::AssertSqlSafe(sql)), args).fetch_all(e).await?.iter().map(row).collect()
        }
    };
}
pub(crate) use runners;

/// One column of a row.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Val {
    #[default]
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bool(bool),
    Json(Value),
    Texts(Vec<String>),
}

/// A row from either dialect. Accessors read what the other dialect would
/// give too: a boolean from SQLite's 0/1, an array or JSON from its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Val>);

impl Row {
    fn val(&self, i: usize) -> &Val {
        self.0.get(i).unwrap_or(&Val::Null)
    }

    fn bad(&self, i: usize, want: &str) -> StoreError {
        StoreError::Decode(format!("column {i}: expected {want}, got {:?}", self.val(i)))
    }

    pub fn is_null(&self, i: usize) -> bool {
        self.val(i) == &Val::Null
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.val(i) {
            Val::Null => Ok(None),
            Val::Int(n) => Ok(Some(*n)),
            Val::Real(r) if r.fract() == 0.0 => Ok(Some(*r as i64)),
            Val::Bool(b) => Ok(Some(i64::from(*b))),
            Val::Text(t) => t.parse().map(Some).map_err(|_| self.bad(i, "an integer")),
            _ => Err(self.bad(i, "an integer")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?.ok_or_else(|| self.bad(i, "an integer"))
    }

    /// An integer column narrowed to `i32` (batch numbers, generations).
    pub fn int32(&self, i: usize) -> Result<i32, StoreError> {
        i32::try_from(self.int(i)?).map_err(|_| self.bad(i, "a 32-bit integer"))
    }

    pub fn opt_real(&self, i: usize) -> Result<Option<f64>, StoreError> {
        match self.val(i) {
            Val::Null => Ok(None),
            Val::Real(r) => Ok(Some(*r)),
            Val::Int(n) => Ok(Some(*n as f64)),
            Val::Text(t) => t.parse().map(Some).map_err(|_| self.bad(i, "a number")),
            _ => Err(self.bad(i, "a number")),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.val(i) {
            Val::Null => Ok(None),
            Val::Text(t) => Ok(Some(t.clone())),
            Val::Int(n) => Ok(Some(n.to_string())),
            _ => Err(self.bad(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.bad(i, "text"))
    }

    pub fn opt_bool(&self, i: usize) -> Result<Option<bool>, StoreError> {
        match self.val(i) {
            Val::Null => Ok(None),
            Val::Bool(b) => Ok(Some(*b)),
            Val::Int(n) => Ok(Some(*n != 0)),
            Val::Text(t) if t == "true" || t == "1" => Ok(Some(true)),
            Val::Text(t) if t == "false" || t == "0" => Ok(Some(false)),
            _ => Err(self.bad(i, "a boolean")),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.opt_bool(i)?.unwrap_or(false))
    }

    /// An array column (null reads as empty).
    pub fn texts(&self, i: usize) -> Result<Vec<String>, StoreError> {
        match self.val(i) {
            Val::Null => Ok(Vec::new()),
            Val::Texts(t) => Ok(t.clone()),
            Val::Text(t) => serde_json::from_str(t).map_err(|_| self.bad(i, "a JSON array")),
            Val::Json(v) => serde_json::from_value(v.clone()).map_err(|_| self.bad(i, "an array")),
            _ => Err(self.bad(i, "an array")),
        }
    }

    /// Moves a text column out of the row (a hot path: output rows).
    pub fn take_text(&mut self, i: usize) -> Result<Option<String>, StoreError> {
        match self.0.get_mut(i).map(std::mem::take) {
            None | Some(Val::Null) => Ok(None),
            Some(Val::Text(t)) => Ok(Some(t)),
            Some(v) => Err(StoreError::Decode(format!("column {i}: expected text, got {v:?}"))),
        }
    }

    /// Moves a text column that may not be null out of the row.
    pub fn take_string(&mut self, i: usize) -> Result<String, StoreError> {
        self.take_text(i)?.ok_or_else(|| StoreError::Decode(format!("column {i}: expected text, got null")))
    }

    /// Moves a JSON column out of the row (null reads as `null`).
    pub fn take_json(&mut self, i: usize) -> Result<Value, StoreError> {
        match self.0.get_mut(i).map(std::mem::take) {
            None | Some(Val::Null) => Ok(Value::Null),
            Some(Val::Json(v)) => Ok(v),
            Some(Val::Text(t)) => {
                serde_json::from_str(&t).map_err(|_| StoreError::Decode(format!("column {i}: expected JSON")))
            }
            Some(v) => Err(StoreError::Decode(format!("column {i}: expected JSON, got {v:?}"))),
        }
    }

    /// A JSON column (null reads as `null`).
    pub fn json(&self, i: usize) -> Result<Value, StoreError> {
        match self.val(i) {
            Val::Null => Ok(Value::Null),
            Val::Json(v) => Ok(v.clone()),
            Val::Text(t) => serde_json::from_str(t).map_err(|_| self.bad(i, "JSON")),
            _ => Err(self.bad(i, "JSON")),
        }
    }
}

/// The SQL dialects, and how each renders the marks of shared SQL text:
///
/// | mark | Postgres | SQLite |
/// |---|---|---|
/// | `now()`, `clock_timestamp()` | as written | `unixepoch('subsec')` |
/// | `greatest(`, `least(` | as written | `max(`, `min(` |
/// | `{secs X}` (a span of X seconds) | `make_interval(secs => X)` | `(X)` |
/// | `{epoch X}` (a time as Unix seconds) | `extract(epoch FROM X)::float8` | `X` |
/// | `{ts X}` (Unix seconds as a time) | `to_timestamp(X)` | `(X)` |
/// | `{in X}` (membership in an array) | `= ANY(X)` | `IN (SELECT value FROM json_each(X))` |
/// | `{len X}` (an array's length) | `cardinality(X)` | `json_array_length(X)` |
/// | `{each X}` (an array's elements as `e.value`) | `unnest(X) AS e(value)` | `json_each(X) AS e` |
/// | `{date X}` (ISO text as a date) | `CAST(X AS DATE)` | `X` |
/// | `{json X a.b}` (a JSON field of column X, as text) | `(X #>> '{a,b}')` | `(X ->> '$.a.b')` |
/// | `{jsonf X a.b}` (the same, as a number) | `(X #>> '{a,b}')::float8` | `(X ->> '$.a.b')` |
/// | `{rows X: a T, b T}` (a JSON array of objects as rows `x`) | `jsonb_to_recordset(X::jsonb) AS x(a T, b T)` | `(SELECT value ->> 'a' AS a, ... FROM json_each(X)) AS x` |
/// | `{for update}` | `FOR UPDATE` | (nothing: writes take the database lock) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Rendered statements by the address and length of their text (every
/// statement is a literal, so the key is stable; the length tells apart a
/// literal the compiler stored inside a longer one).
type Rendered = HashMap<(usize, usize, Dialect), &'static str>;
static RENDERED: Mutex<Option<Rendered>> = Mutex::new(None);

impl Dialect {
    /// `sql` in this dialect, rendered once per statement and kept for the
    /// life of the process (sqlx caches prepared statements by their text).
    pub fn sql(self, sql: &'static str) -> &'static str {
        let key = (sql.as_ptr() as usize, sql.len(), self);
        let mut cache = RENDERED.lock().expect("statement cache lock");
        let cache = cache.get_or_insert_with(HashMap::new);
        cache.entry(key).or_insert_with(|| Box::leak(self.render(sql).into_boxed_str()))
    }

    fn render(self, sql: &str) -> String {
        let out = self.marks(sql);
        match self {
            Dialect::Postgres => out,
            Dialect::Sqlite => out
                .replace("clock_timestamp()", "unixepoch('subsec')")
                .replace("now()", "unixepoch('subsec')")
                .replace("greatest(", "max(")
                .replace("least(", "min("),
        }
    }

    /// Renders every `{name arg}` mark; a mark's argument may hold marks.
    fn marks(self, sql: &str) -> String {
        let mut out = String::with_capacity(sql.len() + 64);
        let mut rest = sql;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let mut depth = 0;
            let close = rest[open..]
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| open + i)
                .expect("a mark ends with }");
            let inner = &rest[open + 1..close];
            let (name, arg) = inner.split_once(' ').unwrap_or((inner, ""));
            out.push_str(&self.mark(name, self.marks(arg).trim()));
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    fn mark(self, name: &str, x: &str) -> String {
        let pg = self == Dialect::Postgres;
        fn path(x: &str) -> (&str, Vec<&str>) {
            let (col, fields) = x.split_once(' ').expect("a JSON mark names a column, then a path");
            (col, fields.split('.').collect())
        }
        match name {
            "secs" if pg => format!("make_interval(secs => {x})"),
            "epoch" if pg => format!("extract(epoch FROM {x})::float8"),
            "ts" if pg => format!("to_timestamp({x})"),
            "secs" | "ts" => format!("({x})"),
            "epoch" => x.to_string(),
            "in" if pg => format!("= ANY({x})"),
            "in" => format!("IN (SELECT value FROM json_each({x}))"),
            "len" if pg => format!("cardinality({x})"),
            "len" => format!("json_array_length({x})"),
            "each" if pg => format!("unnest({x}) AS e(value)"),
            "each" => format!("json_each({x}) AS e"),
            "date" if pg => format!("CAST({x} AS DATE)"),
            "date" => x.to_string(),
            "json" | "jsonf" => {
                let (col, fields) = path(x);
                let cast = if name == "jsonf" && pg { "::float8" } else { "" };
                if pg {
                    format!("({col} #>> '{{{}}}'){cast}", fields.join(","))
                } else {
                    format!("({col} ->> '$.{}')", fields.join("."))
                }
            }
            "rows" => {
                let (param, cols) = x.split_once(':').expect("{rows X: a T, ...}");
                let cols: Vec<(&str, &str)> =
                    cols.split(',').map(|c| c.trim().split_once(' ').expect("a column and its type")).collect();
                if pg {
                    let defs: Vec<String> = cols.iter().map(|(c, t)| format!("{c} {t}")).collect();
                    format!("jsonb_to_recordset({}::jsonb) AS x({})", param.trim(), defs.join(", "))
                } else {
                    // JSON values stay JSON (`->`); the rest are unwrapped (`->>`).
                    let sel: Vec<String> = cols
                        .iter()
                        .map(|(c, t)| {
                            if t.starts_with("json") {
                                format!("value -> '{c}' AS {c}")
                            } else {
                                format!("value ->> '{c}' AS {c}")
                            }
                        })
                        .collect();
                    format!("(SELECT {} FROM json_each({})) AS x", sel.join(", "), param.trim())
                }
            }
            "for" if pg => "FOR UPDATE".to_string(),
            "for" => String::new(),
            other => panic!("unknown SQL mark {{{other}}}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_render_per_dialect() {
        let sql = "UPDATE b SET t = now() + {secs $2} WHERE v {in $1} AND {jsonf spec provider.timeout_secs} > 1 {for update}";
        assert_eq!(
            Dialect::Postgres.render(sql),
            "UPDATE b SET t = now() + make_interval(secs => $2) WHERE v = ANY($1) AND (spec #>> '{provider,timeout_secs}')::float8 > 1 FOR UPDATE"
        );
        assert_eq!(
            Dialect::Sqlite.render(sql),
            "UPDATE b SET t = unixepoch('subsec') + ($2) WHERE v IN (SELECT value FROM json_each($1)) AND (spec ->> '$.provider.timeout_secs') > 1 "
        );
        let nested = "now() - {secs 2 * {jsonf j.spec provider.timeout_secs} + 30}";
        assert_eq!(
            Dialect::Postgres.render(nested),
            "now() - make_interval(secs => 2 * (j.spec #>> '{provider,timeout_secs}')::float8 + 30)"
        );
        assert_eq!(
            Dialect::Sqlite.render(nested),
            "unixepoch('subsec') - (2 * (j.spec ->> '$.provider.timeout_secs') + 30)"
        );
        let rows = "SELECT * FROM {rows $3: n bigint, carried jsonb}";
        assert_eq!(
            Dialect::Postgres.render(rows),
            "SELECT * FROM jsonb_to_recordset($3::jsonb) AS x(n bigint, carried jsonb)"
        );
        assert_eq!(
            Dialect::Sqlite.render(rows),
            "SELECT * FROM (SELECT value ->> 'n' AS n, value -> 'carried' AS carried FROM json_each($3)) AS x"
        );
    }

    #[test]
    fn rows_read_either_dialects_values() {
        let r = Row(vec![Val::Int(1), Val::Text("[\"a\",\"b\"]".into()), Val::Texts(vec!["c".into()]), Val::Null]);
        assert!(r.bool(0).unwrap());
        assert_eq!(r.texts(1).unwrap(), ["a", "b"]);
        assert_eq!(r.texts(2).unwrap(), ["c"]);
        assert_eq!(r.opt_int(3).unwrap(), None);
        assert!(r.text(3).is_err());
    }
}
