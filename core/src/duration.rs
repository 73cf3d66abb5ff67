//! Durations in configuration (`"250ms"`, `"1.5s"`, `"5m"`, `"1h"`, `"30d"`), in
//! integers.

/// `"250ms"`, `"1s"`, `"1.5s"`, `"5m"`, `"1h"`, `"30d"` → milliseconds, rounded half
/// up. Parsed in integers: nothing else in the module needs float parsing,
/// whose tables and code would grow it.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let scale: u128 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    // Up to 30 decimals, the arithmetic below is exact in u128.
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') || frac.len() > 30 {
        return None;
    }
    // An empty part reads as 0 (".5s", "2.s"); `parse` alone refuses it.
    let digits = |d: &str| -> Option<u128> { d.is_empty().then_some(0).or_else(|| d.parse().ok()) };
    let whole = digits(whole)?;
    let denominator = 10u128.pow(frac.len() as u32);
    let numerator = digits(frac)?;
    let ms = whole
        .checked_mul(scale)?
        .checked_add((2 * numerator * scale + denominator) / (2 * denominator))?;
    u64::try_from(ms)
        .ok()
        .filter(|&ms| ms < 1_000_000_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("1s"), Some(1000));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("1"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("30d"), Some(2_592_000_000));
        assert_eq!(parse_duration_ms("1w"), None);
        assert_eq!(parse_duration_ms("0.25s"), Some(250));
        assert_eq!(parse_duration_ms(".5s"), Some(500));
        assert_eq!(parse_duration_ms("2.s"), Some(2000));
        assert_eq!(parse_duration_ms("1.0005s"), Some(1001));
        assert_eq!(parse_duration_ms("1.0004s"), Some(1000));
        assert_eq!(parse_duration_ms("0.5ms"), Some(1));
        assert_eq!(parse_duration_ms("1.0000000000000000000009s"), Some(1000));
        // 1/7,200,000 h is half a millisecond: a hair above it rounds up.
        assert_eq!(parse_duration_ms("0.0000001388888888888888889h"), Some(1));
        assert_eq!(parse_duration_ms("0.0000001388888888888888888h"), Some(0));
        assert_eq!(
            parse_duration_ms("0.0000000000000000000000000000001s"),
            None
        );
        assert_eq!(parse_duration_ms(".s"), None);
        assert_eq!(parse_duration_ms("1.2.3s"), None);
        assert_eq!(parse_duration_ms("1e3s"), None);
        assert_eq!(parse_duration_ms("-1s"), None);
        assert_eq!(
            parse_duration_ms("999999999999999ms"),
            Some(999_999_999_999_999)
        );
        assert_eq!(parse_duration_ms("1000000000000000ms"), None);
        assert_eq!(
            parse_duration_ms("99999999999999999999999999999999999999999h"),
            None
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn up_to_30_decimals_are_read() {
        let decimals = |n: usize| format!("1.{}s", "0".repeat(n));
        assert_eq!(parse_duration_ms(&decimals(30)), Some(1000));
        assert_eq!(parse_duration_ms(&decimals(31)), None);
    }
}
