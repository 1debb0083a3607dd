//! Hijack detection: a table of signals comparing a request with what the session stored before
//! the request changes anything, each with a configurable weight (`security.hijack.*`).
//!
//! | signal | condition | default weight | reason |
//! |---|---|---|---|
//! | IP change, same network | both IPs known, different, same /24 (IPv4) or /64 (IPv6) | 0.1 | "IP address changed from X to Y (same network)" |
//! | IP change, new network | both known, different networks | 0.3 | "IP address changed from X to Y" |
//! | user agent | both known and different | 0.2 | "User agent changed" |
//! | fingerprint mismatch | both present, digests differ and the device rule fails | 0.5 | "Device fingerprint mismatch" |
//! | fingerprint changed | digests differ but the device rule still matches | 0.1 | "Device fingerprint changed" |
//! | accept-language | both fingerprints carry it, it differs, and the device rule still matches (a mismatch already counts it) | 0.1 | "Accept-Language changed" |
//! | IP velocity | more than `velocity_max_ips` (3) distinct IPs used the session within `velocity_window` (5 min) | 0.3 | "Requests from N IP addresses within …" |
//!
//! The score is the sum, capped at 1; a session is ended when it is strictly above the threshold
//! (`security.hijack_threshold`, 0.7). With the defaults the library's cases keep their scores
//! (IP 0.3, fingerprint 0.5, user agent 0.2; fingerprint + user agent is exactly 0.7 and does not
//! end the session), a move within the same /24 weighs a third of a new network, and only a new
//! network together with a new device (or everything at once) ends it.
//!
//! The velocity signal needs the IPs a session was used from recently. They are kept in process
//! memory ([`RecentIps`]: at most 8 per session, two generations of at most `capacity` sessions),
//! not in the store, so the hot path writes nothing for it; with several replicas each sees the
//! share of traffic it serves.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::session::{HijackScorer, RequestContext, SessionRecord};

/// The weights and thresholds of the rule table.
#[derive(Debug, Clone, PartialEq)]
pub struct HijackRules {
    /// IP changed within the same /24 or /64.
    pub ip_same_network: f64,
    /// IP changed to another network.
    pub ip_new_network: f64,
    /// User agent changed.
    pub user_agent: f64,
    /// Fingerprint digest differs and the device rule fails.
    pub fingerprint_mismatch: f64,
    /// Fingerprint digest differs but the device rule matches.
    pub fingerprint_changed: f64,
    /// Accept-Language changed.
    pub accept_language: f64,
    /// Too many IPs within the velocity window.
    pub ip_velocity: f64,
    pub velocity_window: Duration,
    /// Distinct IPs allowed within the window.
    pub velocity_max_ips: u32,
    /// Device-rule threshold used for the fingerprint comparison.
    pub device_match_threshold: f64,
    /// Scores strictly above end the session.
    pub threshold: f64,
}

impl Default for HijackRules {
    fn default() -> Self {
        HijackRules {
            ip_same_network: 0.1,
            ip_new_network: 0.3,
            user_agent: 0.2,
            fingerprint_mismatch: 0.5,
            fingerprint_changed: 0.1,
            accept_language: 0.1,
            ip_velocity: 0.3,
            velocity_window: Duration::from_secs(300),
            velocity_max_ips: 3,
            device_match_threshold: 0.8,
            threshold: 0.7,
        }
    }
}

/// Whether two addresses share a /24 (IPv4) or a /64 (IPv6).
pub fn same_network(a: IpAddr, b: IpAddr) -> bool {
    match (a.to_canonical(), b.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..3] == b.octets()[..3],
        (IpAddr::V6(a), IpAddr::V6(b)) => a.octets()[..8] == b.octets()[..8],
        _ => false,
    }
}

/// Scores `request` against `session` as stored. `recent_ips` are the distinct IPs that used the
/// session within the velocity window, the current one included. Pure: no clock, no I/O.
pub fn assess(
    rules: &HijackRules,
    session: &SessionRecord,
    request: &RequestContext,
    recent_ips: usize,
) -> (f64, Vec<String>) {
    let mut score = 0.0;
    let mut reasons = Vec::new();
    let mut add = |weight: f64, reason: String| {
        if weight > 0.0 {
            score += weight;
            reasons.push(reason);
        }
    };

    let stored_ip = session.ip_address.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
    if let (Some(stored), Some(current)) = (stored_ip, request.ip_address)
        && stored.to_canonical() != current.to_canonical()
    {
        if same_network(stored, current) {
            add(rules.ip_same_network, format!("IP address changed from {stored} to {current} (same network)"));
        } else {
            add(rules.ip_new_network, format!("IP address changed from {stored} to {current}"));
        }
    }

    if let (Some(stored), Some(current)) = (session.user_agent.as_deref(), request.user_agent.as_deref())
        && !stored.is_empty()
        && !current.is_empty()
        && stored != current
    {
        add(rules.user_agent, "User agent changed".into());
    }

    if let (Some(stored), Some(presented)) = (&session.fingerprint, &request.fingerprint)
        && !presented.is_empty()
        && stored.digest() != presented.digest()
    {
        if stored.compare(presented, rules.device_match_threshold).matches {
            add(rules.fingerprint_changed, "Device fingerprint changed".into());
            // The language is one of the device rule's fields: it counts on its own only when
            // the device as a whole still matches, so that a mismatch is not counted twice.
            if let (Some(a), Some(b)) = (&stored.accept_language, &presented.accept_language)
                && a != b
            {
                add(rules.accept_language, "Accept-Language changed".into());
            }
        } else {
            add(rules.fingerprint_mismatch, "Device fingerprint mismatch".into());
        }
    }

    if recent_ips > rules.velocity_max_ips as usize {
        let window = humantime::format_duration(rules.velocity_window);
        add(rules.ip_velocity, format!("Requests from {recent_ips} IP addresses within {window}"));
    }

    let score: f64 = score;
    (score.min(1.0), reasons)
}

/// The IPs each session was used from recently, bounded: at most [`RecentIps::PER_SESSION`] per
/// session, and two generations of at most `capacity` sessions each (when the current generation
/// fills up it becomes the previous one and the oldest is dropped), so memory is bounded and
/// every operation is O(1).
#[derive(Debug)]
pub struct RecentIps {
    capacity: usize,
    current: HashMap<String, Vec<(IpAddr, Millis)>>,
    previous: HashMap<String, Vec<(IpAddr, Millis)>>,
}

impl RecentIps {
    /// IPs kept per session.
    pub const PER_SESSION: usize = 8;

    /// Memory for up to about `2 × capacity` sessions.
    pub fn new(capacity: usize) -> RecentIps {
        RecentIps { capacity: capacity.max(1), current: HashMap::new(), previous: HashMap::new() }
    }

    /// Notes that `session_id` was used from `ip` at `now`; returns how many distinct IPs used it
    /// within `window` (this one included).
    pub fn observe(&mut self, session_id: &str, ip: IpAddr, now: Millis, window: Duration) -> usize {
        let since = now.saturating_sub(crate::clock::millis(window));
        let note = |seen: &mut Vec<(IpAddr, Millis)>| {
            seen.retain(|(other, at)| *at > since && *other != ip);
            seen.push((ip, now));
            if seen.len() > Self::PER_SESSION {
                seen.remove(0);
            }
            seen.len()
        };
        // The common case, a session seen in this generation, is updated in place: no key copy.
        if let Some(seen) = self.current.get_mut(session_id) {
            return note(seen);
        }
        let mut seen = self.previous.remove(session_id).unwrap_or_default();
        let count = note(&mut seen);
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(session_id.to_owned(), seen);
        count
    }

    /// Sessions remembered.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The [`HijackScorer`] installed in the session manager: the rule table plus the recent-IP memory.
#[derive(Debug)]
pub struct HijackDetector {
    rules: HijackRules,
    /// Split by session so that concurrent validations rarely wait for one another's lock.
    recent: Box<[Mutex<RecentIps>]>,
    clock: Arc<dyn Clock>,
}

/// Sessions whose recent IPs are remembered, about twice over (see [`RecentIps`]).
const RECENT_SESSIONS: usize = 50_000;
/// Locks the recent-IP memory is split over.
const RECENT_SHARDS: usize = 16;

impl HijackDetector {
    /// A detector with `rules`, remembering recent IPs of up to about 2 × 50 000 sessions.
    pub fn new(rules: HijackRules, clock: Arc<dyn Clock>) -> HijackDetector {
        let recent = (0..RECENT_SHARDS).map(|_| Mutex::new(RecentIps::new(RECENT_SESSIONS / RECENT_SHARDS))).collect();
        HijackDetector { rules, recent, clock }
    }

    fn shard(&self, session_id: &str) -> &Mutex<RecentIps> {
        // FNV-1a: session ids end in random hex, and any spread will do.
        let hash =
            session_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        &self.recent[(hash % RECENT_SHARDS as u64) as usize]
    }

    pub fn rules(&self) -> &HijackRules {
        &self.rules
    }
}

impl HijackScorer for HijackDetector {
    fn score(&self, session: &SessionRecord, request: &RequestContext) -> (f64, Vec<String>) {
        let recent = match request.ip_address {
            Some(ip) => {
                // A poisoned lock only means another scoring panicked mid-insert; the map is whole.
                let mut memory = self.shard(&session.session_id).lock().unwrap_or_else(|p| p.into_inner());
                memory.observe(&session.session_id, ip, self.clock.now(), self.rules.velocity_window)
            }
            None => 0,
        };
        assess(&self.rules, session, request, recent)
    }

    fn threshold(&self) -> f64 {
        self.rules.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_slash_24_and_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_network(ip("192.0.2.10"), ip("192.0.2.200")));
        assert!(!same_network(ip("192.0.2.10"), ip("192.0.3.10")));
        assert!(same_network(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9")));
        assert!(!same_network(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1")));
        assert!(same_network(ip("::ffff:192.0.2.1"), ip("192.0.2.7")));
        assert!(!same_network(ip("192.0.2.1"), ip("2001:db8::1")));
    }

    #[test]
    fn recent_ips_count_distinct_addresses_in_the_window_and_stay_bounded() {
        let mut memory = RecentIps::new(2);
        let window = Duration::from_secs(300);
        let ip = |i: u8| IpAddr::from([198, 51, 100, i]);
        assert_eq!(memory.observe("s", ip(1), 0, window), 1);
        assert_eq!(memory.observe("s", ip(1), 1_000, window), 1);
        assert_eq!(memory.observe("s", ip(2), 2_000, window), 2);
        // Outside the window the first two are forgotten.
        assert_eq!(memory.observe("s", ip(3), 301_500, window), 2);
        for i in 0..20 {
            memory.observe("s", ip(10 + i), 303_000, window);
        }
        assert_eq!(memory.observe("s", ip(99), 303_000, window), RecentIps::PER_SESSION);
        for i in 0..100 {
            memory.observe(&format!("other-{i}"), ip(1), 0, window);
        }
        assert!(memory.len() <= 4, "{}", memory.len());
    }
}
