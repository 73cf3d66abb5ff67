//! Two questions about JSON text that serde answers only at a price in
//! module size: the field path at a byte offset (for the error serde_json
//! reports there), and where a top-level member's value lies (to share a
//! configuration without its keys). One small scanner answers both; it
//! expects text serde_json has parsed (or was parsing when it stopped) and
//! never fails, at worst answering with a shorter path.

/// One open container while scanning.
enum Frame {
    /// An object and the last key read in it.
    Object(Option<String>),
    /// An array and the index of the last value started in it.
    Array(Option<usize>),
}

/// What a scanned token was.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    /// An object key.
    Key,
    /// The start of a value (a scalar, or `{` / `[`).
    Value,
    /// A closing bracket, `:` or `,`.
    Other,
}

/// The scanner's position: the text, where it is, and the open containers.
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
    stack: Vec<Frame>,
}

impl<'a> Scan<'a> {
    fn new(text: &'a [u8]) -> Self {
        Scan {
            text,
            at: 0,
            stack: Vec::new(),
        }
    }

    /// Advances over one token: what it was and where it started; `None`
    /// at the end of the text.
    fn step(&mut self) -> Option<(Token, usize)> {
        self.skip_space();
        let begin = self.at;
        let c = *self.text.get(self.at)?;
        let token = match c {
            b'{' | b'[' => {
                self.value_starts();
                self.stack.push(if c == b'{' {
                    Frame::Object(None)
                } else {
                    Frame::Array(None)
                });
                self.at += 1;
                Token::Value
            }
            b'}' | b']' => {
                self.stack.pop();
                self.at += 1;
                Token::Other
            }
            b':' | b',' => {
                self.at += 1;
                Token::Other
            }
            b'"' => {
                // A string right after `{` or `,` in an object is a key.
                let is_key = matches!(self.stack.last(), Some(Frame::Object(_)))
                    && self.previous_structural() != Some(b':');
                let (text, end) = string_at(self.text, self.at);
                self.at = end;
                match self.stack.last_mut() {
                    Some(Frame::Object(key)) if is_key => {
                        *key = Some(text);
                        Token::Key
                    }
                    _ => {
                        self.value_starts();
                        Token::Value
                    }
                }
            }
            _ => {
                // A number or a literal: up to the next delimiter (at least
                // this byte, which is none).
                self.value_starts();
                self.at += 1;
                while self
                    .text
                    .get(self.at)
                    .is_some_and(|b| !b",:]}\" \t\r\n".contains(b))
                {
                    self.at += 1;
                }
                Token::Value
            }
        };
        Some((token, begin))
    }

    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    /// A value starts: in an array, it is the next element.
    fn value_starts(&mut self) {
        if let Some(Frame::Array(index)) = self.stack.last_mut() {
            *index = Some(index.map_or(0, |i| i + 1));
        }
    }

    /// The last structural character before the token at `self.at`.
    fn previous_structural(&self) -> Option<u8> {
        self.text
            .get(..self.at)?
            .iter()
            .rev()
            .copied()
            .find(|b| !b.is_ascii_whitespace())
    }

    /// The path of the open containers, as `a.b[2].c`.
    fn path(&self) -> String {
        let mut out = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Object(Some(key)) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
                Frame::Array(Some(i)) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
                Frame::Object(None) | Frame::Array(None) => {}
            }
        }
        out
    }
}

/// The string token starting at `start` (a `"`), decoded (escapes other
/// than `\uXXXX` kept as the escaped character; an invalid one as is), and
/// the offset after it.
fn string_at(text: &[u8], start: usize) -> (String, usize) {
    let mut out = Vec::new();
    let mut i = start + 1;
    while let Some(&c) = text.get(i) {
        match c {
            b'"' => return (String::from_utf8_lossy(&out).into_owned(), i + 1),
            b'\\' => {
                let e = text.get(i + 1).copied().unwrap_or(b'\\');
                let hex = text
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                match (e, hex.and_then(char::from_u32)) {
                    (b'u', Some(ch)) => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        i += 6;
                    }
                    _ => {
                        out.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            b'b' => 8,
                            b'f' => 12,
                            other => other,
                        });
                        i += 2;
                    }
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), text.len())
}

/// The field path (`keys[2].rate_limit.burst`) of the place serde_json
/// names by `line` and `column` (1-based, columns in bytes) in `text`;
/// empty at the top level. With `container`, the path of the innermost
/// object or array still open there (serde reports a missing field at the
/// end of the object that lacks it, not at its last field).
pub fn path_at(text: &[u8], line: usize, column: usize, container: bool) -> String {
    let mut start = 0;
    for _ in 1..line {
        match text
            .get(start..)
            .and_then(|t| t.iter().position(|&b| b == b'\n'))
        {
            Some(nl) => start += nl + 1,
            None => break,
        }
    }
    // serde_json's position is the byte it was looking at (1-based column):
    // every token that starts before it was read.
    let offset = (start + column).saturating_sub(1).min(text.len());
    let mut scan = Scan::new(text);
    loop {
        scan.skip_space();
        if scan.at >= offset || scan.step().is_none() {
            if container {
                match scan.stack.last_mut() {
                    Some(Frame::Object(key)) => *key = None,
                    Some(Frame::Array(index)) => *index = None,
                    None => {}
                }
            }
            return scan.path();
        }
    }
}

/// The byte range of the value of the top-level member `name` of the JSON
/// object `text`, if it has one.
pub fn member_value(text: &[u8], name: &str) -> Option<(usize, usize)> {
    let mut scan = Scan::new(text);
    let mut wanted = false;
    loop {
        let (token, begin) = scan.step()?;
        let depth = scan.stack.len();
        match token {
            Token::Key if depth == 1 => {
                wanted = matches!(scan.stack.last(), Some(Frame::Object(Some(k))) if k == name);
            }
            // The member's value: a scalar (still at depth 1) or a container
            // just opened (depth 2), scanned to its end.
            Token::Value if wanted && depth <= 2 => {
                while scan.stack.len() > 1 {
                    scan.step()?;
                }
                return Some((begin, scan.at));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    fn path_of_error(text: &str) -> String {
        let e = serde_json::from_str::<crate::config::KeyList>(text)
            .err()
            .map(|e| {
                (
                    e.line(),
                    e.column(),
                    e.to_string().starts_with("missing field"),
                )
            });
        let (line, column, container) = e.unwrap_or((0, 0, false));
        path_at(text.as_bytes(), line, column, container)
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn the_path_names_the_field_serde_stopped_at() {
        assert_eq!(path_of_error(r#"{"version": "one"}"#), "version");
        assert_eq!(
            path_of_error(r#"{"keys": [{"id": "a", "sha256": "x"}, {"id": 7}]}"#),
            "keys[1].id"
        );
        assert_eq!(
            path_of_error("{\"keys\": [\n {\"id\": \"a\", \"sha256\": \"x\"},\n {\"id\": \"b\", \"sha256\": \"y\", \"rate_limit\": {\"burst\": \"many\"}}]}"),
            "keys[1].rate_limit.burst"
        );
        assert_eq!(path_of_error(r#"{"kyes": []}"#), "kyes");
        assert_eq!(path_of_error(r#"{"keys": [{"id": "a"}]}"#), "keys[0]");
        assert_eq!(
            path_of_error(r#"{"keys": [{"id": "\u0061", "sh\u0061256": 1}]}"#),
            "keys[0].sha256"
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_top_level_member_is_found_whatever_comes_before_it() {
        let text = r#"{"rules": [{"keys": 1}], "k\u0065ys" : [ {"id": "a]"} ] , "realm": "x"}"#;
        let (a, b) = member_value(text.as_bytes(), "keys").unwrap_or((0, 0));
        assert_eq!(&text[a..b], r#"[ {"id": "a]"} ]"#);
        let (a, b) = member_value(text.as_bytes(), "realm").unwrap_or((0, 0));
        assert_eq!(&text[a..b], r#""x""#);
        let text = r#"{"realm": "x", "keys": 5}"#;
        let (a, b) = member_value(text.as_bytes(), "keys").unwrap_or((0, 0));
        assert_eq!(&text[a..b], "5");
        assert_eq!(member_value(br#"{"realm": "keys"}"#, "keys"), None);
        assert_eq!(member_value(b"[1, 2]", "keys"), None);
    }
}
