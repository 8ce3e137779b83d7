//! The detection fields that the CEF and LEEF writers read by name, collected
//! in one pass over a detection's fields.
//!
//! Looking up each of them in the detection's field table would hash a name
//! for every mapped key of every event. Here each field name of the event is
//! classified instead, with a perfect hash built at compile time: one
//! multiplication and at most one string comparison per name.

use std::borrow::Cow;

use crate::detection::{Detection, FieldRef, FieldValue};

/// Declares [`Field`] with one variant per field, named as the field is.
macro_rules! known_fields {
    ($($field:ident),+ $(,)?) => {
        /// A detection field that the CEF or LEEF writer reads by name: every
        /// field of the CEF header and mapping, which include all that LEEF
        /// reads. The variant's name is the field's name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(super) enum Field {
            $($field),+
        }

        impl Field {
            /// Every field, in declaration order, so `ALL[f as usize] == f`.
            pub(super) const ALL: &'static [Field] = &[$(Field::$field),+];
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),+];
        }
    };
}

known_fields!(
    AlertTitle,
    IoaDefinitionId,
    Category,
    Source,
    MachineName,
    FileName,
    FilePath,
    UserDomain,
    UserName,
    Sha1,
    Sha256,
    Md5,
    ThreatName,
    Actor,
    IpAddress,
    Url,
    RemediationIsSuccess,
    WasExecutingWhileDetected,
    AlertId,
    LinkToWDATP,
    AlertTime,
    MachineDomain,
    LogOnUsers,
    CommandLine,
    FullId,
    ReportID,
    LinkToMTP,
    LastProcessedTimeUtc,
    ComputerDnsName,
    DeviceID,
    Description,
    RemediationAction,
    Severity,
);

const FIELD_COUNT: usize = Field::ALL.len();

const BUCKET_BITS: u32 = 6;

/// Multiplier of the name hash, found by trying random odd numbers.
/// [`BUCKETS`] does not compile unless it gives every known name its own
/// bucket.
const MULTIPLIER: u32 = 0xC89D_A11B;

/// Returns the bucket of a non-empty name: a multiplicative hash of its first
/// byte, last byte and length.
const fn bucket(name: &[u8]) -> usize {
    let key = name[0] as u32 | (name[name.len() - 1] as u32) << 8 | (name.len() as u32) << 16;
    (key.wrapping_mul(MULTIPLIER) >> (32 - BUCKET_BITS)) as usize
}

/// For each bucket, the index of its field in [`Field::ALL`] plus one, or
/// zero when no known name falls in it.
const BUCKETS: [u8; 1 << BUCKET_BITS] = {
    let mut buckets = [0u8; 1 << BUCKET_BITS];
    let mut index = 0;
    while index < FIELD_COUNT {
        let bucket = bucket(Field::NAMES[index].as_bytes());
        assert!(buckets[bucket] == 0, "two known field names share a bucket: pick another MULTIPLIER");
        buckets[bucket] = index as u8 + 1;
        index += 1;
    }
    buckets
};

impl Field {
    /// Returns the known field called `name`, if there is one.
    pub(super) fn from_name(name: &str) -> Option<Field> {
        if name.is_empty() {
            return None;
        }
        let index = usize::from(BUCKETS[bucket(name.as_bytes())]).checked_sub(1)?;
        (Self::NAMES[index] == name).then_some(Self::ALL[index])
    }

    pub(super) fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// The known fields of one detection, and where they are among its fields.
pub(super) struct KnownFields<'a> {
    detection: &'a Detection,
    /// Values are resolved on use, because LEEF reads only some of them.
    entries: [Option<FieldRef<'a>>; FIELD_COUNT],
    /// The first `found` entries are the position of each known field among
    /// the detection's fields, ascending. A name occurs once in the field
    /// table, so there are at most `FIELD_COUNT`.
    positions: [(usize, Field); FIELD_COUNT],
    found: usize,
    /// The field table cannot be built, so `entries` is empty and text is
    /// read with the detection's scanner.
    table_failed: bool,
}

impl<'a> KnownFields<'a> {
    /// Reads the known fields of `detection` in one pass over its fields.
    pub(super) fn read(detection: &'a Detection) -> Self {
        let mut known = Self {
            detection,
            entries: [None; FIELD_COUNT],
            positions: [(0, Field::AlertTitle); FIELD_COUNT],
            found: 0,
            table_failed: detection.field_error().is_some(),
        };
        for (position, entry) in detection.field_refs().enumerate() {
            if let Some(field) = Field::from_name(entry.name()) {
                known.entries[field as usize] = Some(entry);
                known.positions[known.found] = (position, field);
                known.found += 1;
            }
        }
        known
    }

    /// Iterates over all fields of the detection in the object's order, each
    /// with the known field it is, found by [`KnownFields::read`] without
    /// comparing names again.
    pub(super) fn classified(&self) -> impl Iterator<Item = (Option<Field>, FieldRef<'a>)> + '_ {
        let mut known = self.positions[..self.found].iter().peekable();
        self.detection.field_refs().enumerate().map(move |(position, entry)| {
            let field = known.next_if(|(at, _)| *at == position).map(|&(_, field)| field);
            (field, entry)
        })
    }

    pub(super) fn detection(&self) -> &'a Detection {
        self.detection
    }

    /// Returns the value of `field` as [`Detection::get`] does.
    pub(super) fn get(&self, field: Field) -> Option<FieldValue<'a>> {
        self.entries[field as usize].map(FieldRef::value)
    }

    /// Returns the text of `field` as [`Detection::text`] does, which reads
    /// it with the scanner when the field table cannot be built.
    pub(super) fn text(&self, field: Field) -> Option<Cow<'a, str>> {
        if self.table_failed {
            return self.detection.text(field.name());
        }
        self.get(field).and_then(FieldValue::text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_name_finds_every_known_field() {
        for &field in Field::ALL {
            assert_eq!(Field::from_name(field.name()), Some(field), "{field:?}");
            assert_eq!(Field::ALL[field as usize], field);
        }
    }

    #[test]
    fn from_name_rejects_other_names() {
        for name in ["", "A", "category", "Categorx", "xategory", "Category ", "FileHash", "AlertPart", "cs1", "使"] {
            assert_eq!(Field::from_name(name), None, "{name:?}");
        }
    }

    #[test]
    fn read_matches_detection_lookups() {
        let text = std::fs::read_to_string("tests/data/format-edge-cases.json").unwrap();
        let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_str(&text).unwrap();
        for item in &items {
            let d = Detection::from_raw(item).unwrap();
            let known = KnownFields::read(&d);
            for &field in Field::ALL {
                assert_eq!(known.get(field), d.get(field.name()), "{field:?} of {}", d.raw());
                assert_eq!(known.text(field), d.text(field.name()), "{field:?} of {}", d.raw());
            }
        }
    }
}
