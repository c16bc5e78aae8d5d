//! Finding a key given twice in a control line's object.
//!
//! serde_json keeps the last of two equal keys without a word, so
//! `{"type":"mode","id":1,"mode":"colo","type":"checkpoint"}` would run a checkpoint while a
//! person reading the line (or a log of it) sees a mode change. A command with a repeated key
//! is refused instead.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The first top-level key of a JSON object that appears twice, if any. Only the top level
/// matters: every command field is a scalar, and nested values (in extra fields, which are
/// ignored) never reach a command.
pub(crate) fn first_duplicate(line: &[u8]) -> Option<String> {
    serde_json::from_slice::<TopLevelKeys>(line).ok().and_then(|k| k.duplicate)
}

/// The result of scanning an object's keys; any other JSON value scans as no duplicate.
struct TopLevelKeys {
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeysVisitor)
    }
}

struct KeysVisitor;

impl<'de> Visitor<'de> for KeysVisitor {
    type Value = TopLevelKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevelKeys, A::Error> {
        // A line is at most MAX_LINE bytes, so the set is bounded too.
        let mut seen = HashSet::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            if duplicate.is_none() && !seen.insert(key.clone()) {
                duplicate = Some(key);
            }
        }
        Ok(TopLevelKeys { duplicate })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevelKeys, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TopLevelKeys { duplicate: None })
    }

    fn visit_bool<E>(self, _: bool) -> Result<TopLevelKeys, E> {
        Ok(TopLevelKeys { duplicate: None })
    }
    fn visit_i64<E>(self, _: i64) -> Result<TopLevelKeys, E> {
        Ok(TopLevelKeys { duplicate: None })
    }
    fn visit_u64<E>(self, _: u64) -> Result<TopLevelKeys, E> {
        Ok(TopLevelKeys { duplicate: None })
    }
    fn visit_f64<E>(self, _: f64) -> Result<TopLevelKeys, E> {
        Ok(TopLevelKeys { duplicate: None })
    }
    fn visit_str<E>(self, _: &str) -> Result<TopLevelKeys, E> {
        Ok(TopLevelKeys { duplicate: None })
    }
    fn visit_unit<E>(self) -> Result<TopLevelKeys, E> {
        Ok(TopLevelKeys { duplicate: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::message::Command;

    #[test]
    fn finds_the_first_repeated_top_level_key() {
        assert_eq!(first_duplicate(br#"{"type":"checkpoint","id":1}"#), None);
        assert_eq!(first_duplicate(br#"{"type":"mode","id":1,"type":"checkpoint"}"#).as_deref(), Some("type"));
        assert_eq!(first_duplicate(br#"{"id":1,"id":2,"type":"x","type":"y"}"#).as_deref(), Some("id"));
        // Escapes name the same key.
        assert_eq!(first_duplicate(br#"{"type":"a","typ\u0065":"b"}"#).as_deref(), Some("type"));
        // Nested objects and other values are not commands' business.
        assert_eq!(first_duplicate(br#"{"type":"x","by":{"a":1,"a":2}}"#), None);
        assert_eq!(first_duplicate(br#"[1,1]"#), None);
        assert_eq!(first_duplicate(b"null"), None);
    }

    #[test]
    fn a_command_with_a_repeated_key_is_refused() {
        // serde_json alone would take the last `type` and run a checkpoint.
        let e = Command::parse(br#"{"type":"mode","id":1,"mode":"colo","type":"checkpoint"}"#).unwrap_err();
        assert_eq!(e.id, Some(1));
        assert_eq!(e.message, "duplicate key `type`");
        let e = Command::parse(br#"{"type":"checkpoint","id":1,"id":2}"#).unwrap_err();
        assert_eq!(e.id, None, "which id would be ambiguous");
        assert_eq!(e.message, "duplicate key `id`");
        let e = Command::parse(br#"{"type":"mode","id":3,"mode":"passive","mode":"colo"}"#).unwrap_err();
        assert_eq!((e.id, e.message.as_str()), (Some(3), "duplicate key `mode`"));
        // Extra fields may repeat inside nested values.
        assert_eq!(
            Command::parse(br#"{"type":"checkpoint","id":4,"by":{"a":1,"a":2}}"#),
            Ok(Command::Checkpoint { id: 4 })
        );
    }
}
