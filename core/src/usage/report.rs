//! The usage report an Envoy POSTs to the control plane, and its checks
//! (`keygate serve` parses it with [`UsageReport::parse`]).

use serde::{Deserialize, Serialize};

use super::MAX_REPORT_KEYS;

/// What an Envoy POSTs to the control plane:
/// `{"keys": [{"id": "acme", "requests": 12, "last_used": 1765065600}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// One record per key id.
    pub keys: Vec<ReportedKey>,
}

/// One key's usage in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedKey {
    /// The key's id.
    pub id: String,
    /// Allowed requests since the last report (at least 1).
    pub requests: u64,
    /// Unix seconds of the latest (to the reporting Envoy's tick).
    pub last_used: i64,
}

impl UsageReport {
    /// Parses and checks a report body. The error names the field, as
    /// `keys[3].requests: must be at least 1`.
    pub fn parse(body: &[u8]) -> Result<UsageReport, String> {
        // The same parser as the configuration's: the error names the field
        // by its path (`report` for the document itself), and bytes after
        // the report are refused.
        let report: UsageReport = crate::error::parse_json(body, "report")
            .map_err(|errors| errors.first().map(|e| e.to_string()).unwrap_or_default())?;
        if report.keys.len() > MAX_REPORT_KEYS {
            return Err(format!(
                "keys: {} records, at most {MAX_REPORT_KEYS} per report",
                report.keys.len()
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(report.keys.len());
        for (i, k) in report.keys.iter().enumerate() {
            let id_ok = !k.id.is_empty()
                && k.id.len() <= 128
                && k.id.bytes().all(|b| (0x21..=0x7e).contains(&b));
            if !id_ok {
                return Err(format!(
                    "keys[{i}].id: must be 1-128 visible ASCII characters"
                ));
            }
            if !seen.insert(k.id.as_str()) {
                return Err(format!("keys[{i}].id: {:?} is given twice", k.id));
            }
            if k.requests == 0 {
                return Err(format!("keys[{i}].requests: must be at least 1"));
            }
            if k.last_used < 0 {
                return Err(format!(
                    "keys[{i}].last_used: must be Unix seconds (0 or more)"
                ));
            }
        }
        Ok(report)
    }
}
