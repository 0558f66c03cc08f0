//! `cellmaster serve --config FILE`: polling settings and nodes listed by hand (machines
//! that do not register themselves, e.g. booted without `celld.master=`). Every value is
//! checked; an error names the line and the field.
//!
//! ```toml
//! poll_interval_ms = 2000   # 50..=600000
//! down_after = 3            # missed polls before Down, 1..=100
//! max_in_flight = 256       # polls out at once, 1..=65536
//!
//! [[node]]
//! id = "rack1-07"           # [A-Za-z0-9.-], 1 to 63 characters
//! address = "10.0.4.7:7100" # host:port of its celld
//! labels = { zone = "a" }
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use crate::registry::valid_node_id;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file} line {line}: {field}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedNode {
    pub id: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasterConfig {
    pub poll_interval_ms: Option<u64>,
    pub down_after: Option<u32>,
    pub max_in_flight: Option<usize>,
    pub nodes: Vec<ListedNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    poll_interval_ms: Option<Spanned<u64>>,
    down_after: Option<Spanned<u32>>,
    max_in_flight: Option<Spanned<usize>>,
    #[serde(default)]
    node: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// `host:port` with a port in 1..=65535 and a host without spaces or a scheme.
fn valid_address(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty() && !host.contains(['/', ' ']) && port.parse::<u16>().is_ok_and(|p| p != 0)
}

pub fn parse(file: &str, text: &str) -> Result<MasterConfig, ConfigError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let err = |offset: usize, field: &str, problem: String| ConfigError {
        file: file.to_string(),
        line: line_of(offset),
        field: field.to_string(),
        problem,
    };
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        err(offset, "(syntax)", e.message().to_string())
    })?;
    let mut config = MasterConfig::default();
    // A number within its range, or an error naming it.
    fn ranged<T: PartialOrd + Copy + std::fmt::Display>(
        v: Option<Spanned<T>>,
        range: std::ops::RangeInclusive<T>,
        field: &str,
        err: &dyn Fn(usize, &str, String) -> ConfigError,
    ) -> Result<Option<T>, ConfigError> {
        match v {
            Some(v) if !range.contains(v.get_ref()) => Err(err(
                v.span().start,
                field,
                format!(
                    "{} is outside {}..={}",
                    v.get_ref(),
                    range.start(),
                    range.end()
                ),
            )),
            v => Ok(v.map(|v| *v.get_ref())),
        }
    }
    config.poll_interval_ms = ranged(raw.poll_interval_ms, 50..=600_000, "poll_interval_ms", &err)?;
    config.down_after = ranged(raw.down_after, 1..=100, "down_after", &err)?;
    config.max_in_flight = ranged(raw.max_in_flight, 1..=65_536, "max_in_flight", &err)?;
    let mut seen = BTreeSet::new();
    for n in raw.node {
        let id = n.id.get_ref();
        if !valid_node_id(id) {
            return Err(err(
                n.id.span().start,
                "node.id",
                format!("{id:?} is not a node id: [A-Za-z0-9.-], 1 to 63 characters"),
            ));
        }
        if !seen.insert(id.clone()) {
            return Err(err(
                n.id.span().start,
                "node.id",
                format!("{id:?} is listed twice"),
            ));
        }
        if !valid_address(n.address.get_ref()) {
            return Err(err(
                n.address.span().start,
                "node.address",
                format!(
                    "{:?} is not host:port (e.g. \"10.0.4.7:7100\")",
                    n.address.get_ref()
                ),
            ));
        }
        config.nodes.push(ListedNode {
            id: n.id.into_inner(),
            address: n.address.into_inner(),
            labels: n.labels,
        });
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            "master.toml",
            "poll_interval_ms = 500\ndown_after = 4\n\n[[node]]\nid = \"n1\"\n\
             address = \"10.0.4.7:7100\"\nlabels = { zone = \"a\" }\n",
        )
        .unwrap();
        assert_eq!(c.poll_interval_ms, Some(500));
        assert_eq!(c.down_after, Some(4));
        assert_eq!(c.nodes[0].id, "n1");
        assert_eq!(c.nodes[0].labels["zone"], "a");
        assert_eq!(parse("m", "").unwrap(), MasterConfig::default());
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("poll_interval_ms = 5\n", 1, "poll_interval_ms"),
            ("down_after = 0\n", 1, "down_after"),
            (
                "\n[[node]]\nid = \"a b\"\naddress = \"x:1\"\n",
                3,
                "node.id",
            ),
            (
                "[[node]]\nid = \"a\"\naddress = \"http://x\"\n",
                3,
                "node.address",
            ),
            (
                "[[node]]\nid = \"a\"\naddress = \"x:0\"\n",
                3,
                "node.address",
            ),
            (
                "[[node]]\nid = \"a\"\naddress = \"x:1\"\n[[node]]\nid = \"a\"\naddress = \"y:1\"\n",
                5,
                "node.id",
            ),
            ("\nbogus = 1\n", 2, "(syntax)"),
        ];
        for (text, line, field) in cases {
            let e = parse("m.toml", text).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{text:?}: {e}");
        }
    }
}
