//! Runs a definition's query and loads its rows into a per-run staging table, inside the caller's
//! transaction: with `INSERT … SELECT` when the query runs on the state database itself, with a
//! streamed `COPY` otherwise. Rows are checked in SQL on the way; nothing is held in memory.

use futures_util::TryStreamExt;
use sqlx::{Executor, PgConnection, PgPool, Statement};

use crate::batch::limits::MAX_CUSTOM_ID_CHARS;
use crate::config::Definition;

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
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{definition}: the query failed: {message}")]
    Query { definition: String, message: String },
    #[error("{definition}: the query returns {columns} columns; an audience query returns one column, the user id (Batch's custom_id)")]
    Shape { definition: String, columns: usize },
    #[error("{definition}: staging the rows failed: {source}")]
    Staging {
        definition: String,
        source: sqlx::Error,
    },
}

const SAMPLE_LIMIT: i64 = 5;
const COPY_CHUNK_BYTES: usize = 256 * 1024;

/// Fills the temp table `staging (custom_id text, value jsonb)` (dropped at commit) with the
/// definition's distinct valid users.
pub async fn stage(
    conn: &mut PgConnection,
    source: Source<'_>,
    definition: &Definition,
) -> Result<StageReport, SourceError> {
    let label = || format!("audience {:?}", definition.name);
    let query_error = |error: sqlx::Error| SourceError::Query {
        definition: label(),
        message: database_message(&error),
    };
    let staging_error = |source: sqlx::Error| SourceError::Staging {
        definition: label(),
        source,
    };

    let columns = match source {
        Source::StateDatabase => conn.prepare(definition.query.as_str()).await,
        Source::Other(pool) => pool.prepare(definition.query.as_str()).await,
    }
    .map_err(query_error)?
    .columns()
    .len();
    if columns != 1 {
        return Err(SourceError::Shape {
            definition: label(),
            columns,
        });
    }

    conn.execute("CREATE TEMP TABLE staging_raw (row_no bigint, custom_id text) ON COMMIT DROP")
        .await
        .map_err(staging_error)?;

    // `q(c)` names the single column whatever the query called it; `::text` lets integer ids in.
    let select_ids = format!("SELECT q.c::text FROM ({}) AS q(c)", definition.query);
    match source {
        Source::StateDatabase => {
            let insert = format!(
                "INSERT INTO staging_raw (row_no, custom_id) \
                 SELECT row_number() OVER (), ids.c FROM ({select_ids}) AS ids(c)"
            );
            conn.execute(insert.as_str()).await.map_err(query_error)?;
        }
        Source::Other(pool) => {
            copy_from(conn, pool, &select_ids)
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

    let staged = sqlx::query(
        "CREATE TEMP TABLE staging ON COMMIT DROP AS \
         SELECT custom_id, 'true'::jsonb AS value FROM staging_raw \
         WHERE custom_id <> '' AND length(custom_id) <= $1 \
         GROUP BY custom_id",
    )
    .bind(MAX_CUSTOM_ID_CHARS as i32)
    .execute(&mut *conn)
    .await
    .map_err(staging_error)?
    .rows_affected() as i64;
    conn.execute("ANALYZE staging")
        .await
        .map_err(staging_error)?;

    Ok(StageReport {
        source_rows,
        skipped_rows,
        skipped_samples,
        duplicate_rows: source_rows - skipped_rows - staged,
        staged,
    })
}

enum CopyError {
    Source(sqlx::Error),
    Target(sqlx::Error),
}

/// Streams ids from another database into `staging_raw` through `COPY … FROM STDIN`, in chunks.
async fn copy_from(
    conn: &mut PgConnection,
    pool: &PgPool,
    select_ids: &str,
) -> Result<(), CopyError> {
    let mut rows = sqlx::query_scalar::<_, Option<String>>(select_ids).fetch(pool);
    let mut copy = conn
        .copy_in_raw("COPY staging_raw (row_no, custom_id) FROM STDIN")
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
        let Some(id) = next else { break };
        row_no += 1;
        buffer.extend_from_slice(row_no.to_string().as_bytes());
        buffer.push(b'\t');
        match id {
            Some(id) => push_copy_text(&mut buffer, &id),
            None => buffer.extend_from_slice(b"\\N"),
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
    use super::push_copy_text;

    #[test]
    fn copy_text_escapes_separators() {
        let mut buffer = Vec::new();
        push_copy_text(&mut buffer, "a\tb\nc\\d\re");
        assert_eq!(buffer, b"a\\tb\\nc\\\\d\\re");
    }
}
