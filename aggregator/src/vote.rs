//! The vote message: decoding and validating a delivery body, and encoding one.
//!
//! This module owns the wire contract of docs/DESIGN.md: a UTF-8 JSON object of at most
//! [`MAX_BODY_BYTES`] with `vote_id` (UUID), `election_id` and `candidate_id` (1–64
//! characters of `A-Z a-z 0-9 . _ : -`), optional `precinct_id` (same charset) and
//! `cast_at` (RFC 3339). Unknown fields are ignored. Decoding never panics, whatever the
//! bytes (a property test checks it); anything it refuses comes back as a
//! [`Rejection`] whose reason goes to the dead-letter queue.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4096;
/// Longest identifier accepted, in characters.
pub const MAX_ID_CHARS: usize = 64;

/// A valid vote.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Vote {
    /// Idempotency key: a vote is counted once per UUID.
    pub vote_id: Uuid,
    /// Election the vote belongs to.
    pub election_id: String,
    /// Candidate voted for.
    pub candidate_id: String,
    /// Precinct where it was cast, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precinct_id: Option<String>,
    /// When the vote was cast (stored with microsecond precision, like PostgreSQL).
    #[serde(serialize_with = "ser_rfc3339")]
    pub cast_at: DateTime<Utc>,
}

fn ser_rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

impl Vote {
    /// The JSON body of this vote, as a publisher sends it.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why a body was refused. `kind` is a small fixed set (a metric label); `detail` is the
/// human explanation written to the dead-letter header `x-reject-reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable machine-readable reason.
    pub kind: RejectKind,
    /// Human-readable detail.
    pub detail: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.detail)
    }
}

/// The kinds of rejection (the `reason` label of the rejected-votes metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// Body larger than [`MAX_BODY_BYTES`].
    TooLarge,
    /// Body is not UTF-8.
    NotUtf8,
    /// Body is not a JSON object.
    MalformedJson,
    /// A required field is absent or null.
    MissingField,
    /// A field is present but not valid.
    InvalidField,
}

impl RejectKind {
    /// Every kind, for pre-registering metric label values.
    pub const ALL: [RejectKind; 5] = [
        RejectKind::TooLarge,
        RejectKind::NotUtf8,
        RejectKind::MalformedJson,
        RejectKind::MissingField,
        RejectKind::InvalidField,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectKind::TooLarge => "too_large",
            RejectKind::NotUtf8 => "not_utf8",
            RejectKind::MalformedJson => "malformed_json",
            RejectKind::MissingField => "missing_field",
            RejectKind::InvalidField => "invalid_field",
        }
    }
}

fn reject(kind: RejectKind, detail: impl Into<String>) -> Rejection {
    Rejection {
        kind,
        detail: detail.into(),
    }
}

/// Decodes and validates one delivery body.
///
/// # Errors
/// A [`Rejection`] saying why the body is not a valid vote.
pub fn decode(body: &[u8]) -> Result<Vote, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(reject(
            RejectKind::TooLarge,
            format!(
                "body is {} bytes, the limit is {MAX_BODY_BYTES}",
                body.len()
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        reject(
            RejectKind::NotUtf8,
            format!("body is not UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    // serde would also accept a JSON array for a struct; the contract says object.
    if !text.trim_start().starts_with('{') {
        return Err(reject(
            RejectKind::MalformedJson,
            "body is not a JSON object",
        ));
    }
    let wire: Wire<'_> = serde_json::from_str(text)
        .map_err(|e| reject(RejectKind::MalformedJson, format!("not a JSON object: {e}")))?;

    let vote_id_raw = required("vote_id", wire.vote_id)?;
    let vote_id = Uuid::try_parse(&vote_id_raw).map_err(|_| {
        reject(
            RejectKind::InvalidField,
            format!("vote_id {:?} is not a UUID", truncate(&vote_id_raw)),
        )
    })?;
    if vote_id.is_nil() {
        return Err(reject(
            RejectKind::InvalidField,
            "vote_id must not be the nil UUID",
        ));
    }
    let election_id = identifier("election_id", required("election_id", wire.election_id)?)?;
    let candidate_id = identifier("candidate_id", required("candidate_id", wire.candidate_id)?)?;
    let precinct_id = match wire.precinct_id {
        None | Some(Field::Null) => None,
        Some(f) => Some(identifier("precinct_id", string("precinct_id", f)?)?),
    };
    let cast_raw = required("cast_at", wire.cast_at)?;
    let cast_at = DateTime::parse_from_rfc3339(&cast_raw)
        .map_err(|e| {
            reject(
                RejectKind::InvalidField,
                format!(
                    "cast_at {:?} is not an RFC 3339 timestamp ({e})",
                    truncate(&cast_raw)
                ),
            )
        })?
        .with_timezone(&Utc);
    // PostgreSQL keeps microseconds; truncating here makes in-memory comparisons agree
    // with what the database stores.
    let micros = cast_at.nanosecond() / 1_000 * 1_000;
    let cast_at = cast_at.with_nanosecond(micros).unwrap_or(cast_at);

    Ok(Vote {
        vote_id,
        election_id: election_id.into_owned(),
        candidate_id: candidate_id.into_owned(),
        precinct_id: precinct_id.map(Cow::into_owned),
        cast_at,
    })
}

fn required<'a>(name: &str, field: Option<Field<'a>>) -> Result<Cow<'a, str>, Rejection> {
    match field {
        None | Some(Field::Null) => Err(reject(
            RejectKind::MissingField,
            format!("{name} is required"),
        )),
        Some(f) => string(name, f),
    }
}

fn string<'a>(name: &str, field: Field<'a>) -> Result<Cow<'a, str>, Rejection> {
    match field {
        Field::Str(s) => Ok(s),
        Field::Null | Field::Other => Err(reject(
            RejectKind::InvalidField,
            format!("{name} must be a string"),
        )),
    }
}

fn identifier<'a>(name: &str, value: Cow<'a, str>) -> Result<Cow<'a, str>, Rejection> {
    let ok_len = !value.is_empty() && value.len() <= MAX_ID_CHARS; // ASCII-only below, so bytes = chars
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok_len && ok_chars {
        Ok(value)
    } else {
        Err(reject(
            RejectKind::InvalidField,
            format!(
                "{name} {:?} must be 1-{MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ : -",
                truncate(&value)
            ),
        ))
    }
}

/// Keeps rejection reasons short when the offending value is long.
fn truncate(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_string()
    } else {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    }
}

/// The body as it arrives: every field optional and of any JSON type, so a wrong type
/// is reported with the field's name instead of serde's position-only message.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    vote_id: Option<Field<'a>>,
    #[serde(borrow, default)]
    election_id: Option<Field<'a>>,
    #[serde(borrow, default)]
    candidate_id: Option<Field<'a>>,
    #[serde(borrow, default)]
    precinct_id: Option<Field<'a>>,
    #[serde(borrow, default)]
    cast_at: Option<Field<'a>>,
}

/// One JSON value, reduced to what validation needs.
enum Field<'a> {
    Str(Cow<'a, str>),
    Null,
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Field<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"{"vote_id":"0190a5b2-7c4e-7d1a-9f3b-2b8c1d0e4f51","election_id":"2026-general","candidate_id":"cand-7","precinct_id":"p:12","cast_at":"2026-11-03T14:05:06.123456Z","extra":{"ignored":[1,2]}}"#;

    fn kind(body: &[u8]) -> RejectKind {
        decode(body).expect_err("should be rejected").kind
    }

    #[test]
    fn decodes_a_valid_vote_and_ignores_unknown_fields() {
        let v = decode(GOOD.as_bytes()).expect("valid");
        assert_eq!(v.election_id, "2026-general");
        assert_eq!(v.candidate_id, "cand-7");
        assert_eq!(v.precinct_id.as_deref(), Some("p:12"));
        assert_eq!(v.cast_at.timestamp_subsec_micros(), 123_456);
    }

    #[test]
    fn each_kind_of_bad_body_has_its_reason() {
        assert_eq!(kind(&[b' '; MAX_BODY_BYTES + 1]), RejectKind::TooLarge);
        assert_eq!(kind(b"\xff\xfe{}"), RejectKind::NotUtf8);
        assert_eq!(kind(b"{not json"), RejectKind::MalformedJson);
        assert_eq!(kind(b"[1,2]"), RejectKind::MalformedJson);
        let missing = GOOD.replace(r#""candidate_id":"cand-7","#, "");
        let r = decode(missing.as_bytes()).expect_err("missing");
        assert_eq!(r.kind, RejectKind::MissingField);
        assert_eq!(r.to_string(), "missing_field: candidate_id is required");
        let bad_uuid = GOOD.replace("0190a5b2-7c4e", "zz90a5b2-7c4e");
        assert_eq!(kind(bad_uuid.as_bytes()), RejectKind::InvalidField);
        let bad_chars = GOOD.replace("cand-7", "cand 7!");
        assert_eq!(kind(bad_chars.as_bytes()), RejectKind::InvalidField);
        let too_long = GOOD.replace("cand-7", &"c".repeat(65));
        assert_eq!(kind(too_long.as_bytes()), RejectKind::InvalidField);
        let bad_time = GOOD.replace("2026-11-03T14:05:06.123456Z", "yesterday");
        assert_eq!(kind(bad_time.as_bytes()), RejectKind::InvalidField);
        let wrong_type = GOOD.replace(r#""cand-7""#, "7");
        let r = decode(wrong_type.as_bytes()).expect_err("number");
        assert_eq!(r.detail, "candidate_id must be a string");
    }

    #[test]
    fn null_precinct_is_absent_but_null_required_field_is_missing() {
        let v = decode(GOOD.replace(r#""p:12""#, "null").as_bytes()).expect("valid");
        assert_eq!(v.precinct_id, None);
        let r = decode(GOOD.replace(r#""cand-7""#, "null").as_bytes()).expect_err("null");
        assert_eq!(r.kind, RejectKind::MissingField);
    }

    fn ident() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._:-]{1,64}"
    }

    prop_compose! {
        fn any_vote()(id in any::<u128>().prop_filter("non-nil", |v| *v != 0),
                      election in ident(), candidate in ident(),
                      precinct in proptest::option::of(ident()),
                      secs in 0i64..4_102_444_800, micros in 0u32..1_000_000) -> Vote {
            Vote {
                vote_id: Uuid::from_u128(id),
                election_id: election,
                candidate_id: candidate,
                precinct_id: precinct,
                cast_at: DateTime::from_timestamp(secs, micros * 1000).unwrap_or_default(),
            }
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = decode(&body);
        }

        #[test]
        fn decoder_never_panics_on_json_like_text(body in r#"\{("[a-z_]{1,12}":("[^"]{0,70}"|[0-9.e-]{1,8}|null|true|\[\]|\{\}),?){0,7}\}"#) {
            let _ = decode(body.as_bytes());
        }

        #[test]
        fn encode_then_decode_round_trips(vote in any_vote()) {
            let decoded = decode(&vote.to_json()).expect("encoded votes are valid");
            prop_assert_eq!(decoded, vote);
        }
    }
}
