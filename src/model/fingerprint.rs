//! Device fingerprints and the rule that decides whether two belong to the same device.
//!
//! The rule follows the original library, minus its accidents:
//! 1. **Critical fields** (`user_agent`, `platform`, `timezone`) must be equal wherever either
//!    side has a value: a value on one side only is a difference, a field absent on both sides
//!    is no evidence either way.
//! 2. **Scored fields** (`accept_language`, `screen_resolution`, `color_depth`, `pixel_ratio`,
//!    `touch_support`, `device_memory`, `hardware_concurrency`, the canvas, WebGL and audio
//!    hashes, and the `fonts` and `plugins` sets) count only when both sides have a value. The
//!    sets agree when their Jaccard similarity is at least 0.8 (a new font does not make a new
//!    device). The share of agreeing fields must reach the threshold (0.8 by default).
//! 3. If no field at all could be compared, the device cannot be recognised: no match (fail
//!    closed). Unlike the library, an absent `touch_support` is absent, not `false`.
//!
//! The digest (SHA-256 of a canonical encoding of every field, extras included) identifies a
//! fingerprint exactly; hijack detection uses it as one signal.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a client presented about its device (the domain twin of the proto message).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fingerprint {
    /// User-Agent header.
    pub user_agent: Option<String>,
    /// Accept-Language header.
    pub accept_language: Option<String>,
    /// Platform name.
    pub platform: Option<String>,
    /// IANA time zone.
    pub timezone: Option<String>,
    /// "WIDTHxHEIGHT".
    pub screen_resolution: Option<String>,
    /// Colour depth in bits.
    pub color_depth: Option<i32>,
    /// Device pixel ratio.
    pub pixel_ratio: Option<f64>,
    /// Whether the device reports a touch screen.
    pub touch_support: Option<bool>,
    /// Device memory in GiB.
    pub device_memory: Option<i32>,
    /// Logical processors.
    pub hardware_concurrency: Option<i32>,
    /// Canvas rendering hash.
    pub canvas_fingerprint: Option<String>,
    /// WebGL parameters hash.
    pub webgl_fingerprint: Option<String>,
    /// Audio rendering hash.
    pub audio_fingerprint: Option<String>,
    /// Detected fonts.
    pub fonts: BTreeSet<String>,
    /// Detected plugins.
    pub plugins: BTreeSet<String>,
    /// Further signals: part of the digest, not scored.
    pub extras: BTreeMap<String, String>,
}

/// How two fingerprints compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Whether they are taken to be the same device.
    pub matches: bool,
    /// Share of compared scored fields that agreed (1.0 when none was compared).
    pub similarity: f64,
    /// Names of critical fields that differed.
    pub critical_differences: Vec<&'static str>,
    /// How many fields (critical and scored) had values to compare.
    pub compared: usize,
}

fn critical(name: &'static str, a: &Option<String>, b: &Option<String>, diffs: &mut Vec<&'static str>) -> usize {
    match (a, b) {
        (None, None) => 0,
        (Some(x), Some(y)) if x == y => 1,
        _ => {
            diffs.push(name);
            1
        }
    }
}

fn scored<T: PartialEq>(a: &Option<T>, b: &Option<T>, compared: &mut usize, agreed: &mut usize) {
    if let (Some(x), Some(y)) = (a, b) {
        *compared += 1;
        if x == y {
            *agreed += 1;
        }
    }
}

fn scored_set(a: &BTreeSet<String>, b: &BTreeSet<String>, compared: &mut usize, agreed: &mut usize) {
    if a.is_empty() || b.is_empty() {
        return;
    }
    *compared += 1;
    let common = a.intersection(b).count() as f64;
    let union = a.union(b).count() as f64;
    if common / union >= 0.8 {
        *agreed += 1;
    }
}

impl Fingerprint {
    /// Whether nothing at all was presented.
    pub fn is_empty(&self) -> bool {
        self == &Fingerprint::default()
    }

    /// Compares a stored fingerprint (`self`) with a presented one at `threshold`.
    pub fn compare(&self, presented: &Fingerprint, threshold: f64) -> Comparison {
        let mut diffs = Vec::new();
        let mut compared = critical("user_agent", &self.user_agent, &presented.user_agent, &mut diffs);
        compared += critical("platform", &self.platform, &presented.platform, &mut diffs);
        compared += critical("timezone", &self.timezone, &presented.timezone, &mut diffs);

        let (mut scored_count, mut agreed) = (0, 0);
        let p = presented;
        scored(&self.accept_language, &p.accept_language, &mut scored_count, &mut agreed);
        scored(&self.screen_resolution, &p.screen_resolution, &mut scored_count, &mut agreed);
        scored(&self.color_depth, &p.color_depth, &mut scored_count, &mut agreed);
        let ratio = |r: &Option<f64>| r.map(|v| (v * 1000.0).round() as i64);
        scored(&ratio(&self.pixel_ratio), &ratio(&p.pixel_ratio), &mut scored_count, &mut agreed);
        scored(&self.touch_support, &p.touch_support, &mut scored_count, &mut agreed);
        scored(&self.device_memory, &p.device_memory, &mut scored_count, &mut agreed);
        scored(&self.hardware_concurrency, &p.hardware_concurrency, &mut scored_count, &mut agreed);
        scored(&self.canvas_fingerprint, &p.canvas_fingerprint, &mut scored_count, &mut agreed);
        scored(&self.webgl_fingerprint, &p.webgl_fingerprint, &mut scored_count, &mut agreed);
        scored(&self.audio_fingerprint, &p.audio_fingerprint, &mut scored_count, &mut agreed);
        scored_set(&self.fonts, &p.fonts, &mut scored_count, &mut agreed);
        scored_set(&self.plugins, &p.plugins, &mut scored_count, &mut agreed);

        let similarity = if scored_count == 0 { 1.0 } else { agreed as f64 / scored_count as f64 };
        compared += scored_count;
        let matches = diffs.is_empty() && compared > 0 && similarity >= threshold;
        Comparison { matches, similarity, critical_differences: diffs, compared }
    }

    /// SHA-256 of a canonical encoding of every field, as hex.
    pub fn digest(&self) -> String {
        // serde_json writes struct fields in declaration order and BTree collections sorted,
        // so the encoding is canonical for a given value.
        let encoded = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&encoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laptop() -> Fingerprint {
        Fingerprint {
            user_agent: Some("Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0".into()),
            accept_language: Some("en-GB,en;q=0.9".into()),
            platform: Some("Linux x86_64".into()),
            timezone: Some("Europe/London".into()),
            screen_resolution: Some("1920x1080".into()),
            color_depth: Some(24),
            pixel_ratio: Some(1.0),
            touch_support: Some(false),
            device_memory: Some(8),
            hardware_concurrency: Some(8),
            canvas_fingerprint: Some("c1".into()),
            webgl_fingerprint: Some("w1".into()),
            audio_fingerprint: Some("a1".into()),
            fonts: ["Arial", "DejaVu Sans", "Noto", "Ubuntu", "Cantarell"].map(String::from).into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_same_device_matches_itself() {
        let c = laptop().compare(&laptop(), 0.8);
        assert!(c.matches);
        assert_eq!(c.similarity, 1.0);
    }

    #[test]
    fn a_critical_difference_is_a_mismatch() {
        let mut other = laptop();
        other.timezone = Some("America/New_York".into());
        let c = laptop().compare(&other, 0.8);
        assert!(!c.matches);
        assert_eq!(c.critical_differences, vec!["timezone"]);

        // A critical value on one side only is a difference too.
        let mut missing = laptop();
        missing.platform = None;
        assert!(!laptop().compare(&missing, 0.8).matches);
    }

    #[test]
    fn scored_fields_must_reach_the_threshold() {
        // 2 of 11 scored fields differ: 9/11 = 0.82 >= 0.8.
        let mut other = laptop();
        other.screen_resolution = Some("2560x1440".into());
        other.pixel_ratio = Some(2.0);
        let c = laptop().compare(&other, 0.8);
        assert!(c.matches, "{c:?}");
        // A third difference: 8/11 = 0.73 < 0.8.
        other.canvas_fingerprint = Some("c2".into());
        assert!(!laptop().compare(&other, 0.8).matches);
    }

    #[test]
    fn fields_absent_on_either_side_are_not_evidence() {
        let stored =
            Fingerprint { user_agent: Some("ua".into()), screen_resolution: Some("1x1".into()), ..Default::default() };
        let presented = Fingerprint { user_agent: Some("ua".into()), color_depth: Some(24), ..Default::default() };
        // Only user_agent can be compared, and it agrees; no scored field is shared.
        let c = stored.compare(&presented, 0.8);
        assert!(c.matches);
        assert_eq!(c.compared, 1);
        // Unlike the library, an identical fingerprint without touch_support still matches.
        let bare = Fingerprint { user_agent: Some("ua".into()), platform: Some("p".into()), ..Default::default() };
        assert!(bare.compare(&bare, 0.8).matches);
    }

    #[test]
    fn nothing_comparable_is_no_match() {
        let a = Fingerprint { screen_resolution: Some("1x1".into()), ..Default::default() };
        let b = Fingerprint { color_depth: Some(24), ..Default::default() };
        assert!(!a.compare(&b, 0.8).matches);
    }

    #[test]
    fn font_sets_tolerate_small_changes() {
        let mut other = laptop();
        other.fonts.insert("Fira Code".into());
        // 5 common of 6: Jaccard 0.83 counts as agreement.
        assert_eq!(laptop().compare(&other, 1.0).similarity, 1.0);
        other.fonts = ["Comic Sans"].map(String::from).into();
        assert!(laptop().compare(&other, 1.0).similarity < 1.0);
    }

    #[test]
    fn the_digest_is_stable_and_sensitive() {
        assert_eq!(laptop().digest(), laptop().digest());
        let mut other = laptop();
        other.extras.insert("k".into(), "v".into());
        assert_ne!(laptop().digest(), other.digest());
    }
}
