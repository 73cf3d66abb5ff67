//! Configuration errors: a problem and the path of the field it is about.

use std::fmt;

/// A configuration problem, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path of the field, e.g. `keys[2].sha256`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

pub(crate) fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// Deserializes JSON, naming the field of the first problem by its path
/// (`root` when the problem is the document itself).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    root: &str,
) -> Result<T, Vec<ConfigError>> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if matches!(path.as_str(), "." | "?" | "") {
            root.to_string()
        } else {
            path
        };
        vec![err(field, e.into_inner().to_string())]
    })
}
