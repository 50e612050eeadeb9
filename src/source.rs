//! Runs a definition's query and loads its rows into a per-run staging table, inside the caller's
//! transaction: with `INSERT … SELECT` when the query runs on the state database itself, with a
//! streamed `COPY` otherwise. Rows are checked in SQL on the way; nothing is held in memory.

use futures_util::TryStreamExt;
use sqlx::{Column, Executor, PgConnection, PgPool, Statement, TypeInfo};

use crate::batch::limits::{
    MAX_ARRAY_ITEMS, MAX_CUSTOM_ID_CHARS, MAX_STRING_VALUE_CHARS, MAX_URL_CHARS,
};
use crate::config::{Definition, ValueType};
use crate::domain::DefinitionKind;

/// Where a definition's query runs.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The state database: rows never leave PostgreSQL.
    StateDatabase,
    /// Another database: rows are streamed from it into staging with `COPY`.
    Other(&'a PgPool),
}

/// What loading one definition's rows found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageReport {
    /// Rows the query returned.
    pub source_rows: i64,
    /// Rows skipped for a NULL, empty or too long user id.
    pub skipped_rows: i64,
    /// A few of the skipped rows, described (`row 17: NULL user id`).
    pub skipped_samples: Vec<String>,
    /// Valid rows that repeated a user id already seen.
    pub duplicate_rows: i64,
    /// Distinct users staged.
    pub staged: i64,
    /// Computed traits: users whose value Batch would refuse (kept out of the diff, recorded in
    /// `rejections`).
    pub invalid_values: i64,
    /// A few of them, described (`user u17: a string of 412 characters; …`).
    pub invalid_samples: Vec<String>,
    /// The attribute name the values go under (`date(key)` for a timestamp trait).
    pub attribute: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{definition}: the query failed: {message}")]
    Query { definition: String, message: String },
    #[error("{definition}: the query returns {columns} columns; {expected}")]
    Shape {
        definition: String,
        columns: usize,
        expected: &'static str,
    },
    #[error("{definition}: {message}")]
    ValueType { definition: String, message: String },
    #[error("{definition}: staging the rows failed: {source}")]
    Staging {
        definition: String,
        source: sqlx::Error,
    },
}

const SAMPLE_LIMIT: i64 = 5;
const COPY_CHUNK_BYTES: usize = 256 * 1024;

/// How a definition's rows become Batch values, as SQL over the query's columns `q.c` (user id)
/// and `q.v` (value): the JSON value, what is wrong with it (NULL when nothing), and the attribute
/// name it is sent under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueMapping {
    pub attribute: String,
    json_sql: String,
    problem_sql: String,
}

impl ValueMapping {
    /// An audience: every listed user is `true`.
    fn membership(key: &str) -> Self {
        Self {
            attribute: key.to_owned(),
            json_sql: "'true'::jsonb".to_owned(),
            problem_sql: "NULL::text".to_owned(),
        }
    }

    /// A computed trait whose value column has the PostgreSQL type `type_name` (as sqlx names it:
    /// `INT4`, `TEXT[]`…). An unsupported type is an error naming it.
    pub fn for_trait(key: &str, type_name: &str, value_type: ValueType) -> Result<Self, String> {
        let string_problem = |expression: &str, limit: usize| {
            format!(
                "CASE WHEN {expression} = '' THEN 'an empty string (Batch needs at least one character)' \
                      WHEN length({expression}) > {limit} THEN \
                        format('a string of %s characters; Batch takes at most {limit}', length({expression})) END"
            )
        };
        let date = |text_sql: &str, finite_sql: &str| {
            Self {
            attribute: format!("date({key})"),
            json_sql: format!("to_jsonb({text_sql})"),
            problem_sql: format!(
                "CASE WHEN NOT isfinite({finite_sql}) THEN 'an infinite date; Batch takes real dates' END"
            ),
        }
        };
        let is_text = matches!(
            type_name,
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "UUID" | "CITEXT"
        );
        if value_type == ValueType::Url {
            if !is_text {
                return Err(format!(
                    "type = \"url\" needs a text value column, and this one is {type_name}"
                ));
            }
            return Ok(Self {
                attribute: format!("url({key})"),
                json_sql: "to_jsonb(q.v::text)".to_owned(),
                problem_sql: format!(
                    "coalesce({}, CASE WHEN q.v::text !~ '^https?://' \
                                     THEN 'not an http(s) URL' END)",
                    string_problem("q.v::text", MAX_URL_CHARS)
                ),
            });
        }
        let plain = |json_sql: &str, problem_sql: String| Self {
            attribute: key.to_owned(),
            json_sql: json_sql.to_owned(),
            problem_sql,
        };
        let utc_format = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";
        Ok(match type_name {
            _ if is_text => plain(
                "to_jsonb(q.v::text)",
                string_problem("q.v::text", MAX_STRING_VALUE_CHARS),
            ),
            "INT2" | "INT4" | "INT8" | "OID" => plain("to_jsonb(q.v)", "NULL::text".to_owned()),
            "NUMERIC" | "FLOAT4" | "FLOAT8" => plain(
                "to_jsonb(q.v)",
                "CASE WHEN q.v::float8 IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8) \
                      THEN format('%s is not a finite number', q.v) END"
                    .to_owned(),
            ),
            "BOOL" => plain("to_jsonb(q.v)", "NULL::text".to_owned()),
            "TIMESTAMPTZ" => date(&format!("to_char(q.v AT TIME ZONE 'UTC', {utc_format})"), "q.v"),
            // A timestamp without a zone is read as UTC.
            "TIMESTAMP" => date(&format!("to_char(q.v, {utc_format})"), "q.v"),
            "DATE" => date(&format!("to_char(q.v::timestamp, {utc_format})"), "q.v"),
            "TEXT[]" | "VARCHAR[]" | "BPCHAR[]" | "NAME[]" => plain(
                "to_jsonb(q.v::text[])",
                array_problem("q.v::text[]"),
            ),
            "JSONB" | "JSON" => plain(
                // A JSON null is a NULL: the attribute is deleted.
                "nullif(q.v::jsonb, 'null'::jsonb)",
                format!(
                    "CASE jsonb_typeof(q.v::jsonb) \
                       WHEN 'object' THEN 'a JSON object; Batch attributes take strings, numbers, booleans and arrays of strings' \
                       WHEN 'string' THEN {} \
                       WHEN 'array' THEN CASE \
                         WHEN EXISTS (SELECT 1 FROM jsonb_array_elements(q.v::jsonb) e \
                                      WHERE jsonb_typeof(e) <> 'string') \
                           THEN 'a JSON array holding something else than strings' \
                         ELSE {} END END",
                    string_problem("(q.v::jsonb #>> '{}')", MAX_STRING_VALUE_CHARS),
                    array_problem(
                        "ARRAY(SELECT jsonb_array_elements_text(q.v::jsonb))"
                    ),
                ),
            ),
            other => {
                return Err(format!(
                    "the value column has type {other}, which Batch has no attribute for; \
                     cast it to text, a number, boolean, timestamptz, date, text[] or jsonb"
                ))
            }
        })
    }
}

/// What is wrong with an array of strings as a Batch attribute, as SQL (NULL when nothing).
fn array_problem(array_sql: &str) -> String {
    format!(
        "CASE WHEN cardinality({array_sql}) > {MAX_ARRAY_ITEMS} \
                THEN format('an array of %s items; Batch takes at most {MAX_ARRAY_ITEMS}', cardinality({array_sql})) \
              WHEN array_position({array_sql}, NULL) IS NOT NULL THEN 'an array holding NULL' \
              WHEN EXISTS (SELECT 1 FROM unnest({array_sql}) AS item \
                           WHERE item = '' OR length(item) > {MAX_STRING_VALUE_CHARS}) \
                THEN 'an array item that is empty or over {MAX_STRING_VALUE_CHARS} characters' END"
    )
}

/// Fills the temp table `staging (custom_id text, value jsonb, problem text)` (dropped at commit)
/// with the definition's distinct valid users: `value` is the Batch value (NULL for a trait's NULL,
/// which deletes the attribute), `problem` says why Batch would refuse it.
pub async fn stage(
    conn: &mut PgConnection,
    source: Source<'_>,
    definition: &Definition,
) -> Result<StageReport, SourceError> {
    let label = || format!("{} {:?}", definition.kind.as_str(), definition.name);
    let query_error = |error: sqlx::Error| SourceError::Query {
        definition: label(),
        message: database_message(&error),
    };
    let staging_error = |source: sqlx::Error| SourceError::Staging {
        definition: label(),
        source,
    };

    let statement = match source {
        Source::StateDatabase => conn.prepare(definition.query.as_str()).await,
        Source::Other(pool) => pool.prepare(definition.query.as_str()).await,
    }
    .map_err(query_error)?;
    let columns = statement.columns();
    let key = definition.key.as_str();
    let (mapping, select_rows) = match definition.kind {
        DefinitionKind::Audience => {
            if columns.len() != 1 {
                return Err(SourceError::Shape {
                    definition: label(),
                    columns: columns.len(),
                    expected:
                        "an audience query returns one column, the user id (Batch's custom_id)",
                });
            }
            // `q(c)` names the single column whatever the query called it.
            (ValueMapping::membership(key), "q(c)")
        }
        DefinitionKind::ComputedTrait => {
            if columns.len() != 2 {
                return Err(SourceError::Shape {
                    definition: label(),
                    columns: columns.len(),
                    expected:
                        "a computed trait's query returns two columns, the user id and the value",
                });
            }
            let type_name = columns[1].type_info().name().to_owned();
            let mapping = ValueMapping::for_trait(key, &type_name, definition.value_type).map_err(
                |message| SourceError::ValueType {
                    definition: label(),
                    message,
                },
            )?;
            (mapping, "q(c, v)")
        }
    };
    drop(statement);

    conn.execute(
        "CREATE TEMP TABLE staging_raw (row_no bigint, custom_id text, value jsonb, problem text) \
         ON COMMIT DROP",
    )
    .await
    .map_err(staging_error)?;

    // `::text` lets integer ids in.
    let select = format!(
        "SELECT q.c::text, {json}, {problem} FROM ({query}) AS {select_rows}",
        json = mapping.json_sql,
        problem = mapping.problem_sql,
        query = definition.query,
    );
    match source {
        Source::StateDatabase => {
            let insert = format!(
                "INSERT INTO staging_raw (row_no, custom_id, value, problem) \
                 SELECT row_number() OVER (), r.* FROM ({select}) AS r"
            );
            conn.execute(insert.as_str()).await.map_err(query_error)?;
        }
        Source::Other(pool) => {
            copy_from(conn, pool, &select)
                .await
                .map_err(|error| match error {
                    CopyError::Source(error) => query_error(error),
                    CopyError::Target(error) => staging_error(error),
                })?
        }
    }

    let (source_rows, skipped_rows): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE custom_id IS NULL OR custom_id = '' \
                                           OR length(custom_id) > $1) \
         FROM staging_raw",
    )
    .bind(MAX_CUSTOM_ID_CHARS as i32)
    .fetch_one(&mut *conn)
    .await
    .map_err(staging_error)?;

    let skipped_samples = if skipped_rows > 0 {
        sqlx::query_scalar(
            "SELECT format('row %s: %s', row_no, CASE \
                 WHEN custom_id IS NULL THEN 'NULL user id' \
                 WHEN custom_id = '' THEN 'empty user id' \
                 ELSE format('user id of %s characters (%s…)', length(custom_id), left(custom_id, 16)) END) \
             FROM staging_raw \
             WHERE custom_id IS NULL OR custom_id = '' OR length(custom_id) > $1 \
             ORDER BY row_no LIMIT $2",
        )
        .bind(MAX_CUSTOM_ID_CHARS as i32)
        .bind(SAMPLE_LIMIT)
        .fetch_all(&mut *conn)
        .await
        .map_err(staging_error)?
    } else {
        Vec::new()
    };

    // Audiences collapse duplicates with a hash aggregate; a trait keeps each user's first row.
    let collapse = match definition.kind {
        DefinitionKind::Audience => {
            "SELECT custom_id, 'true'::jsonb AS value, NULL::text AS problem FROM staging_raw \
             WHERE custom_id <> '' AND length(custom_id) <= $1 \
             GROUP BY custom_id"
        }
        DefinitionKind::ComputedTrait => {
            "SELECT DISTINCT ON (custom_id) custom_id, value, problem FROM staging_raw \
             WHERE custom_id <> '' AND length(custom_id) <= $1 \
             ORDER BY custom_id, row_no"
        }
    };
    let staged = sqlx::query(&format!(
        "CREATE TEMP TABLE staging ON COMMIT DROP AS {collapse}"
    ))
    .bind(MAX_CUSTOM_ID_CHARS as i32)
    .execute(&mut *conn)
    .await
    .map_err(staging_error)?
    .rows_affected() as i64;
    conn.execute("ANALYZE staging")
        .await
        .map_err(staging_error)?;

    let (invalid_values, invalid_samples) = if definition.kind == DefinitionKind::ComputedTrait {
        let invalid: i64 =
            sqlx::query_scalar("SELECT count(*) FROM staging WHERE problem IS NOT NULL")
                .fetch_one(&mut *conn)
                .await
                .map_err(staging_error)?;
        let samples = if invalid > 0 {
            sqlx::query_scalar(
                "SELECT format('user %s: %s', custom_id, problem) FROM staging \
                 WHERE problem IS NOT NULL ORDER BY custom_id LIMIT $1",
            )
            .bind(SAMPLE_LIMIT)
            .fetch_all(&mut *conn)
            .await
            .map_err(staging_error)?
        } else {
            Vec::new()
        };
        (invalid, samples)
    } else {
        (0, Vec::new())
    };

    Ok(StageReport {
        source_rows,
        skipped_rows,
        skipped_samples,
        duplicate_rows: source_rows - skipped_rows - staged,
        staged,
        invalid_values,
        invalid_samples,
        attribute: mapping.attribute,
    })
}

enum CopyError {
    Source(sqlx::Error),
    Target(sqlx::Error),
}

/// Streams rows from another database into `staging_raw` through `COPY … FROM STDIN`, in chunks.
/// The value is turned into JSON text on the source server, with the same SQL as locally.
async fn copy_from(conn: &mut PgConnection, pool: &PgPool, select: &str) -> Result<(), CopyError> {
    let select_text = format!("SELECT r.c, r.v::text, r.p FROM ({select}) AS r(c, v, p)");
    let mut rows =
        sqlx::query_as::<_, (Option<String>, Option<String>, Option<String>)>(&select_text)
            .fetch(pool);
    let mut copy = conn
        .copy_in_raw("COPY staging_raw (row_no, custom_id, value, problem) FROM STDIN")
        .await
        .map_err(CopyError::Target)?;
    let mut buffer = Vec::with_capacity(COPY_CHUNK_BYTES + 1024);
    let mut row_no: u64 = 0;
    loop {
        let next = match rows.try_next().await {
            Ok(next) => next,
            Err(error) => {
                let _ = copy.abort("source query failed").await;
                return Err(CopyError::Source(error));
            }
        };
        let Some((id, value, problem)) = next else {
            break;
        };
        row_no += 1;
        buffer.extend_from_slice(row_no.to_string().as_bytes());
        for field in [id, value, problem] {
            buffer.push(b'\t');
            match field {
                Some(text) => push_copy_text(&mut buffer, &text),
                None => buffer.extend_from_slice(b"\\N"),
            }
        }
        buffer.push(b'\n');
        if buffer.len() >= COPY_CHUNK_BYTES {
            copy.send(std::mem::take(&mut buffer))
                .await
                .map_err(CopyError::Target)?;
            buffer.reserve(COPY_CHUNK_BYTES + 1024);
        }
    }
    if !buffer.is_empty() {
        copy.send(buffer).await.map_err(CopyError::Target)?;
    }
    copy.finish().await.map_err(CopyError::Target)?;
    Ok(())
}

/// Escapes a value for COPY's text format: backslash, tab, newline and carriage return.
pub fn push_copy_text(buffer: &mut Vec<u8>, value: &str) {
    for byte in value.bytes() {
        match byte {
            b'\\' => buffer.extend_from_slice(b"\\\\"),
            b'\t' => buffer.extend_from_slice(b"\\t"),
            b'\n' => buffer.extend_from_slice(b"\\n"),
            b'\r' => buffer.extend_from_slice(b"\\r"),
            other => buffer.push(other),
        }
    }
}

/// The server's own words for a database error, without sqlx's wrapping.
pub fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{push_copy_text, ValueMapping};
    use crate::config::ValueType;

    #[test]
    fn trait_columns_map_to_batch_attribute_names() {
        let attribute = |type_name: &str, value_type: ValueType| {
            ValueMapping::for_trait("k", type_name, value_type).map(|mapping| mapping.attribute)
        };
        assert_eq!(attribute("INT8", ValueType::FromColumn).unwrap(), "k");
        assert_eq!(attribute("TEXT[]", ValueType::FromColumn).unwrap(), "k");
        assert_eq!(
            attribute("TIMESTAMPTZ", ValueType::FromColumn).unwrap(),
            "date(k)"
        );
        assert_eq!(attribute("DATE", ValueType::FromColumn).unwrap(), "date(k)");
        assert_eq!(attribute("TEXT", ValueType::Url).unwrap(), "url(k)");
        let error = attribute("INT4", ValueType::Url).unwrap_err();
        assert!(error.contains("INT4"), "{error}");
        let error = attribute("BYTEA", ValueType::FromColumn).unwrap_err();
        assert!(
            error.contains("BYTEA") && error.contains("cast it"),
            "{error}"
        );
    }

    #[test]
    fn copy_text_escapes_separators() {
        let mut buffer = Vec::new();
        push_copy_text(&mut buffer, "a\tb\nc\\d\re");
        assert_eq!(buffer, b"a\\tb\\nc\\\\d\\re");
    }
}
