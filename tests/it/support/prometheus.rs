//! A strict parser of the Prometheus text exposition format (0.0.4), for tests: every line must
//! be a `# HELP`, a `# TYPE`, another comment, blank, or a well-formed sample; names and label
//! names must be valid; label values must be properly quoted and escaped; values must be floats;
//! a family's `# TYPE` must come before its samples and each family's lines must be contiguous;
//! a histogram's buckets must end with `+Inf`, be non-decreasing and agree with `_count`.
//!
//! Why not a crate: `prometheus-parse` (the usual choice) skips lines it cannot match, so it
//! would accept a broken exposition, and it has had no release for years.

use std::collections::{BTreeMap, HashSet};

/// One sample: the metric name as written (with `_bucket`, `_sum`, `_count` suffixes), its
/// labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name -> type.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample named `name` whose labels include `labels` exactly; `None` when
    /// there is none. Panics when several samples match (the query is ambiguous).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect();
        assert!(matching.len() <= 1, "{name} {labels:?} matches {} samples: {matching:?}", matching.len());
        matching.first().map(|s| s.value)
    }

    /// Every label value used in samples of `name`, for cardinality checks.
    pub fn label_values(&self, name: &str, label: &str) -> HashSet<String> {
        self.samples.iter().filter(|s| s.name == name).filter_map(|s| s.labels.get(label).cloned()).collect()
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse::<f64>().map_err(|_| format!("bad value {text:?}")),
    }
}

/// Parses `{a="x",b="y"}` starting at `text` (which begins with `{`); returns the labels and
/// the rest of the line.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = &text[1..];
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) | None => return Err("unterminated label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name:?} repeated"));
        }
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && matches!(types.get(base).map(String::as_str), Some("histogram" | "summary"))
        {
            return base;
        }
    }
    name
}

/// Parses `text` strictly; the error names the line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut exposition = Exposition::default();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let enter = |family: &str, finished: &mut HashSet<String>, current: &mut Option<String>| {
        if current.as_deref() != Some(family) {
            if let Some(previous) = current.take() {
                finished.insert(previous);
            }
            if finished.contains(family) {
                return Err(format!("the lines of {family} are not contiguous"));
            }
            *current = Some(family.to_owned());
        }
        Ok(())
    };
    for (number, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", number + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _) => {
                    if !valid_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    enter(name, &mut finished, &mut current).map_err(at)?;
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    if !matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped") {
                        return Err(at(format!("bad type {kind:?}")));
                    }
                    enter(name, &mut finished, &mut current).map_err(at)?;
                    if exposition.samples.iter().any(|s| family_of(&s.name, &exposition.types) == name) {
                        return Err(at("TYPE after samples of its family".into()));
                    }
                    if exposition.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE given twice".into()));
                    }
                }
                (Some("TYPE"), ..) => return Err(at("incomplete TYPE".into())),
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split(' ').filter(|f| !f.is_empty());
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(timestamp) = fields.next() {
            timestamp.parse::<i64>().map_err(|_| at(format!("bad timestamp {timestamp:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = family_of(name, &exposition.types).to_owned();
        enter(&family, &mut finished, &mut current).map_err(at)?;
        let sample = Sample { name: name.to_owned(), labels, value };
        if exposition.samples.iter().any(|s| s.name == sample.name && s.labels == sample.labels) {
            return Err(at("duplicate sample".into()));
        }
        exposition.samples.push(sample);
    }
    check_histograms(&exposition)?;
    Ok(exposition)
}

/// A series' labels, in order.
type Labels = Vec<(String, String)>;

/// Every histogram series: buckets non-decreasing in `le`, ending at `+Inf`, equal to `_count`.
fn check_histograms(exposition: &Exposition) -> Result<(), String> {
    for (family, kind) in &exposition.types {
        if kind != "histogram" {
            continue;
        }
        let bucket_name = format!("{family}_bucket");
        // Labels other than `le` -> (le, count) of each bucket.
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in exposition.samples.iter().filter(|s| s.name == bucket_name) {
            let le = s.labels.get("le").ok_or_else(|| format!("{bucket_name} without le"))?;
            let le = parse_value(le)?;
            let key: Labels =
                s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            let mut sorted = buckets.clone();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
            if sorted.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family} {key:?}: bucket counts decrease"));
            }
            let last = sorted.last().ok_or("empty histogram")?;
            if last.0 != f64::INFINITY {
                return Err(format!("{family} {key:?}: no +Inf bucket"));
            }
            let labels: BTreeMap<String, String> = key.iter().cloned().collect();
            let count = exposition
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                .ok_or_else(|| format!("{family} {key:?}: no _count"))?;
            if count.value != last.1 {
                return Err(format!("{family} {key:?}: _count {} but +Inf bucket {}", count.value, last.1));
            }
        }
    }
    Ok(())
}

#[test]
fn the_parser_accepts_the_format_and_refuses_what_breaks_it() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\n\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\ng 1.5e3\n";
    let parsed = parse(good).unwrap();
    assert_eq!(parsed.value("a_total", &[("y", "q\"\n")]), Some(3.0));
    assert_eq!(parsed.value("g", &[]), Some(1500.0));
    for bad in [
        "a_total{x=1} 3\n",
        "a_total{x=\"1\"} three\n",
        "1a 3\n",
        "a{x=\"1\",x=\"2\"} 1\n",
        "a 1\nb 1\na 2\n",
        "# TYPE h histogram\nh_bucket{le=\"0.1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_count 1\n",
        "a 1 2 3\n",
        "a{x=\"1\"\n",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
