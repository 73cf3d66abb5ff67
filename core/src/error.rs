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
/// (`root` when the problem is the document itself). The document must be
/// the whole input: anything but whitespace after it is refused.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    root: &str,
) -> Result<T, Vec<ConfigError>> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(&mut *de).map_err(|e| {
        // The field is found from where serde_json stopped, not tracked
        // while parsing: serde_path_to_error did that for about 46 KB of
        // module (one wrapper per type deserialized).
        let message = e.to_string();
        let container = message.starts_with("missing field");
        let path = crate::json_scan::path_at(bytes, e.line(), e.column(), container);
        let field = if path.is_empty() {
            root.to_string()
        } else {
            path
        };
        vec![err(field, message)]
    })?;
    de.end().map_err(|e| vec![err(root, e.to_string())])?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use crate::keylist::compile_key_list;
    use crate::Policy;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    /// Found by the `keylist` fuzz target: a page followed by other bytes (a
    /// NUL, a second document) was read up to the end of its first value and
    /// the rest ignored, so two lists sent back to back counted as the first.
    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn bytes_after_the_document_are_refused() {
        let list = br#"{"version": 1, "keys": []}"#;
        assert!(compile_key_list(list).is_ok());
        assert!(compile_key_list(&[list.as_slice(), b" \n\t\r"].concat()).is_ok());
        for tail in [b"\0".as_slice(), br#"{"version": 2}"#, b"x", b"]"] {
            let e = compile_key_list(&[list.as_slice(), tail].concat()).unwrap_err();
            assert_eq!(e[0].field, "key list", "{e:?}");
            assert!(e[0].message.starts_with("trailing characters"), "{e:?}");
        }
        let e = Policy::from_json(br#"{"realm": "a"} {"realm": "b"}"#).unwrap_err();
        assert_eq!(e[0].field, "configuration", "{e:?}");
    }
}
