//! Join tokens in SQLite: a use is counted in the same transaction that checks it, so a
//! token of N uses admits N registrations even when they race.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::sql;
use crate::store::{JoinToken, StoreError, TokenRefusal};

pub(super) fn put(conn: &Connection, t: &JoinToken) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO join_tokens (id, secret_sha256, expires_at, uses_left, node, pxe_text) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            t.id,
            t.secret_sha256,
            t.expires_at,
            t.uses_left,
            t.node,
            t.pxe_text
        ],
    )
    .map_err(sql(format!("put join token {}", t.id)))?;
    Ok(())
}

pub(super) fn take(
    conn: &mut Connection,
    id: &str,
    secret_sha256: &str,
    node: &str,
    now: i64,
) -> Result<Result<u32, TokenRefusal>, StoreError> {
    let op = format!("use join token {id}");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql(op.clone()))?;
    let row: Option<(String, i64, u32, String)> = tx
        .query_row(
            "SELECT secret_sha256, expires_at, uses_left, node FROM join_tokens WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(sql(op.clone()))?;
    let Some((hash, expires_at, uses_left, bound)) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    if !constant_time_eq(hash.as_bytes(), secret_sha256.as_bytes()) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if expires_at <= now {
        return Ok(Err(TokenRefusal::Expired(expires_at)));
    }
    if uses_left == 0 {
        return Ok(Err(TokenRefusal::UsedUp));
    }
    if !bound.is_empty() && bound != node {
        return Ok(Err(TokenRefusal::OtherNode(bound)));
    }
    tx.execute(
        "UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ?1",
        params![id],
    )
    .map_err(sql(op.clone()))?;
    tx.commit().map_err(sql(op))?;
    Ok(Ok(uses_left - 1))
}

pub(super) fn for_pxe(conn: &Connection, now: i64) -> Result<Option<String>, StoreError> {
    conn.query_row(
        "SELECT pxe_text FROM join_tokens WHERE pxe_text IS NOT NULL AND expires_at > ?1 \
         AND uses_left > 0 ORDER BY expires_at DESC LIMIT 1",
        params![now],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql("PXE join token"))
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
