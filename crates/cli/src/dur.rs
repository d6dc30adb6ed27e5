//! Durations on the command line: `500ms`, `30s`, `5m`, `1h`, or a bare number of ms.

/// Parses a duration into milliseconds.
pub fn parse_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 30s, 5m, 1h)"))?;
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_ms;

    #[test]
    fn parses_units() {
        assert_eq!(parse_ms("500ms"), Ok(500));
        assert_eq!(parse_ms("30s"), Ok(30_000));
        assert_eq!(parse_ms("5m"), Ok(300_000));
        assert_eq!(parse_ms("250"), Ok(250));
        assert!(parse_ms("5 parsecs").is_err());
        assert!(parse_ms("").is_err());
        assert!(parse_ms("-1s").is_err());
    }
}
