//! Times as people read them: Unix milliseconds in UTC, ISO 8601.

/// `ms` (Unix milliseconds) as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `ms` (Unix milliseconds) as `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339 with milliseconds).
pub fn utc_millis(ms: i64) -> String {
    let whole = utc(ms);
    format!("{}.{:03}Z", whole.trim_end_matches('Z'), ms.rem_euclid(1000))
}

/// Parses an RFC 3339 time — `YYYY-MM-DDTHH:MM:SS`, optionally with a fraction of a second, then
/// `Z` or an offset such as `+02:00` — or only the date (midnight UTC), into Unix ms.
///
/// # Errors
/// A message saying what a time looks like.
pub fn parse_utc(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not a UTC time like 2026-11-30T21:00:00Z");
    let t = text.trim();
    let (date, clock) = t.split_once(['T', 't', ' ']).unwrap_or((t, "00:00:00Z"));
    // The offset: `Z`, or `±HH:MM` after the seconds (none: UTC).
    let (clock, offset_min) = if let Some(c) = clock.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(at) = clock.rfind(['+', '-']) {
        let (c, off) = clock.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':').ok_or_else(bad)?;
        let (oh, om) = (oh.parse::<i64>().map_err(|_| bad())?, om.parse::<i64>().map_err(|_| bad())?);
        if oh > 23 || om > 59 {
            return Err(bad());
        }
        (c, sign * (oh * 60 + om))
    } else {
        (clock, 0)
    };
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let c: Vec<&str> = clock.split(':').collect();
    let ([y, mo, da], [h, mi, se]) = (&d[..], &c[..]) else { return Err(bad()) };
    let (year, month, day) = (num(y)?, num(mo)?, num(da)?);
    // Milliseconds of a fraction (`.5`, `.123456`): the first three digits.
    let (se, fraction) = se.split_once('.').unwrap_or((se, ""));
    if !fraction.chars().all(|ch| ch.is_ascii_digit()) {
        return Err(bad());
    }
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().map_err(|_| bad())?;
    let (hour, minute, second) = (num(h)?, num(mi)?, num(se)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    // Days from civil (the inverse of `utc`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60) * 1000 + millis)
}

/// A moment as the admin API and the CLI take one: a time, or a duration before now (resolved
/// by the registry's clock when the operation runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// This time (Unix ms).
    At(i64),
    /// This many milliseconds before now.
    Ago(i64),
}

impl Moment {
    /// The moment in Unix ms, with now at `now_ms`.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            Moment::At(ms) => ms,
            Moment::Ago(ms) => now_ms.saturating_sub(ms),
        }
    }

    /// The moment as [`parse_moment`] reads it back.
    pub fn text(self) -> String {
        match self {
            Moment::At(ms) => ms.to_string(),
            Moment::Ago(ms) => format!("{ms}ms"),
        }
    }
}

/// Parses a moment: a UTC time (`2026-11-30T21:00:00Z`, or only the date), Unix milliseconds, or
/// a duration meaning that long ago (`90m`, `2h`, `7d`).
///
/// # Errors
/// A message saying what a moment looks like.
pub fn parse_moment(text: &str) -> Result<Moment, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(Moment::At(ms));
    }
    if let Ok(ago) = crate::config::parse_duration(text) {
        return Ok(Moment::Ago(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)));
    }
    parse_utc(text).map(Moment::At).map_err(|_| {
        format!("`{text}` is not a moment: give a UTC time (2026-11-30T21:00:00Z), Unix ms, or a duration ago (2h)")
    })
}

/// The system clock in Unix milliseconds (what has no application clock at hand uses).
pub fn system_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_796_075_803_765), "2026-11-30T21:56:43Z");
    }

    #[test]
    fn parses_rfc3339_fractions_and_offsets() {
        let at = super::parse_utc("2026-11-30T21:56:43Z").unwrap();
        assert_eq!(super::parse_utc("2026-11-30T21:56:43.250Z").unwrap(), at + 250);
        assert_eq!(super::parse_utc("2026-11-30T21:56:43.123456Z").unwrap(), at + 123);
        assert_eq!(super::parse_utc("2026-11-30T22:56:43+01:00").unwrap(), at);
        assert_eq!(super::parse_utc("2026-11-30T20:26:43-01:30").unwrap(), at);
        assert_eq!(super::parse_utc("2026-11-30T21:56:43").unwrap(), at);
        assert_eq!(super::parse_utc("2026-11-30").unwrap(), at - (21 * 3600 + 56 * 60 + 43) * 1000);
        for bad in ["2026-11-30T21:56:43+1", "2026-11-30T21:56:43.x", "2026-13-01", "noon"] {
            assert!(super::parse_utc(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_moments() {
        use super::{Moment, parse_moment};
        let now = 1_796_075_803_000;
        assert_eq!(parse_moment("2h").unwrap().resolve(now), now - 7_200_000);
        assert_eq!(parse_moment("1700000000000").unwrap(), Moment::At(1_700_000_000_000));
        assert_eq!(parse_moment("2026-11-30T21:56:43Z").unwrap().resolve(0), now);
        assert_eq!(parse_moment(&Moment::Ago(5000).text()).unwrap(), Moment::Ago(5000));
        assert!(parse_moment("yesterday").is_err());
    }

    #[test]
    fn parses_what_it_formats() {
        for ms in [0, 951_782_400_000, 1_796_075_803_000] {
            assert_eq!(super::parse_utc(&super::utc(ms)).unwrap(), ms);
        }
        assert_eq!(super::parse_utc("2000-02-29").unwrap(), 951_782_400_000);
        assert!(super::parse_utc("yesterday").is_err());
        assert!(super::parse_utc("2026-13-01T00:00:00Z").is_err());
    }
}
