//! The results stream: the downstream contract (docs/RESULTS.md) in code. Every batch
//! transaction that counts votes also writes, per election, an outbox event with the
//! per-candidate increments it added ([`crate::db::outbox`]); the relay (`relay`) in
//! each replica publishes committed events to the topic exchange [`EXCHANGE`] (routing
//! key = election) with publisher confirms, then deletes them.
//!
//! What a consumer relies on, and the pure logic of applying it:
//! - [`Event`]: the message body (JSON, with a [`SCHEMA_VERSION`]), AMQP `message_id` =
//!   event id; increments commute, so order does not matter;
//! - at-least-once: an event may arrive twice (a relay died between the broker's confirm
//!   and its delete); [`Reconstruction`] drops repeats by event id;
//! - bootstrap: bind a queue first, then read `vote_statistics` together with
//!   `pg_current_snapshot()`; an event whose transaction the [`Snapshot`] already sees is
//!   in those figures and is skipped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod reconstruction;
pub(crate) mod relay;
pub mod snapshot;

pub use self::reconstruction::{Applied, Difference, Reconstruction, Tallies};
pub use self::snapshot::Snapshot;

/// The durable topic exchange results are published to; routing key = election id.
pub const EXCHANGE: &str = "votes.results";
/// Prefix of a results reader's queue names (`votes.results.reader.<name>`): the
/// names a reader's RabbitMQ user may declare (see `amqp_permissions`).
pub const READER_QUEUE_PREFIX: &str = "votes.results.reader.";
/// The `version` of the event schema this release writes. A consumer refuses other
/// versions (a new version is a new contract).
pub const SCHEMA_VERSION: u32 = 1;
/// AMQP `content_type` of the events.
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP `type` of the events.
pub const MESSAGE_TYPE: &str = "vote-results.increments";

/// One results event: what one committed batch transaction added to one election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// Unique id of the event (also the AMQP `message_id`): the dedupe key.
    pub event_id: uuid::Uuid,
    /// The election (also the routing key).
    pub election_id: String,
    /// Votes added per candidate (each at least 1).
    pub increments: BTreeMap<String, i64>,
    /// The counting transaction's id (`pg_current_xact_id()`, a 64-bit xid8): tells
    /// whether a `vote_statistics` snapshot already holds this event.
    pub xid: u64,
    /// When the counting transaction wrote it (informative; not an order).
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

impl Event {
    /// An event of the current schema version.
    pub fn new(
        event_id: uuid::Uuid,
        election_id: String,
        increments: BTreeMap<String, i64>,
        xid: u64,
        recorded_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        Event {
            version: SCHEMA_VERSION,
            event_id,
            election_id,
            increments,
            xid,
            recorded_at,
        }
    }

    /// The message body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain owned data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a message body.
    ///
    /// # Errors
    /// A one-line reason when it is not JSON of this schema, or of another version.
    pub fn from_json(body: &[u8]) -> Result<Event, String> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version =
            serde_json::from_slice(body).map_err(|e| format!("not a results event: {e}"))?;
        if v.version != SCHEMA_VERSION {
            return Err(format!(
                "results event version {} is not {SCHEMA_VERSION}, the version this reader knows",
                v.version
            ));
        }
        serde_json::from_slice(body).map_err(|e| format!("not a results event: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_round_trips_and_other_versions_are_refused() {
        let e = Event::new(
            uuid::Uuid::nil(),
            "e1".into(),
            BTreeMap::from([("a".into(), 3), ("b".into(), 1)]),
            u64::from(u32::MAX) + 7,
            chrono::DateTime::UNIX_EPOCH,
        );
        let body = e.to_json();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains(r#""version":1"#) && text.contains(r#""xid":4294967302"#),
            "{text}"
        );
        assert_eq!(Event::from_json(&body), Ok(e));
        let newer = text.replace(r#""version":1"#, r#""version":2"#);
        let err = Event::from_json(newer.as_bytes()).expect_err("v2");
        assert!(err.contains("version 2"), "{err}");
        assert!(Event::from_json(b"{}").is_err());
    }
}
