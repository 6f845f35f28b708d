//! WAL file names: what they are, their order, and the segment after a given one.
//! Pure functions; the only names pgwarden archives or restores are the ones below, which
//! also keeps any path trickery out of the archive.

/// What a file in `pg_wal` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 24 hex digits: timeline, log and segment number, 8 each.
    Segment,
    /// `TTTTTTTT.history`: a timeline's history, written at promotion.
    History,
    /// `<segment>.partial`: the last, incomplete segment of the old timeline after promotion.
    Partial,
    /// `<segment>.<8 hex digits>.backup`: a base backup's label.
    Backup,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Classifies a WAL file name; `None` for anything else (never archived or restored).
pub fn kind(name: &str) -> Option<Kind> {
    if name.len() == 24 && is_hex(name) {
        return Some(Kind::Segment);
    }
    if let Some(tli) = name.strip_suffix(".history") {
        return (tli.len() == 8 && is_hex(tli)).then_some(Kind::History);
    }
    if let Some(seg) = name.strip_suffix(".partial") {
        return (seg.len() == 24 && is_hex(seg)).then_some(Kind::Partial);
    }
    if let Some(rest) = name.strip_suffix(".backup") {
        let (seg, off) = rest.split_once('.')?;
        return (seg.len() == 24 && is_hex(seg) && off.len() == 8 && is_hex(off))
            .then_some(Kind::Backup);
    }
    None
}

/// Archiving order: history files first (a standby or a restore needs them to follow a new
/// timeline), then everything else by name, which for segments is WAL order.
pub fn priority(name: &str) -> (u8, &str) {
    match kind(name) {
        Some(Kind::History) => (0, name),
        _ => (1, name),
    }
}

/// The segment following `name` for segments of `segment_size` bytes; `None` when `name` is
/// not a segment or the size is not a power of two between 1 MiB and 1 GiB.
pub fn next_segment(name: &str, segment_size: u64) -> Option<String> {
    if kind(name) != Some(Kind::Segment)
        || !segment_size.is_power_of_two()
        || !((1 << 20)..=(1 << 30)).contains(&segment_size)
    {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_log = 0x1_0000_0000u64 / segment_size;
    let segno = log.checked_mul(per_log)?.checked_add(seg)?.checked_add(1)?;
    let (log, seg) = (segno / per_log, segno % per_log);
    if log > u64::from(u32::MAX) {
        return None;
    }
    Some(format!("{tli:08X}{log:08X}{seg:08X}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind("000000010000000000000001"), Some(Kind::Segment));
        assert_eq!(kind("00000002.history"), Some(Kind::History));
        assert_eq!(
            kind("000000010000000000000003.partial"),
            Some(Kind::Partial)
        );
        assert_eq!(
            kind("000000010000000000000002.00000028.backup"),
            Some(Kind::Backup)
        );
        for bad in [
            "",
            "00000001000000000000000",
            "00000001000000000000000g",
            "000000010000000000000001a",
            "0000000a0000000000000001",
            "../00000002.history",
            "00000002.history/..",
            "RECOVERYXLOG",
            "000000010000000000000001.ready",
        ] {
            assert_eq!(kind(bad), None, "{bad}");
        }
    }

    #[test]
    fn next_segment_wraps_per_segment_size() {
        let m16 = 16 << 20;
        assert_eq!(
            next_segment("000000010000000000000001", m16).as_deref(),
            Some("000000010000000000000002")
        );
        assert_eq!(
            next_segment("0000000100000000000000FF", m16).as_deref(),
            Some("000000010000000100000000")
        );
        assert_eq!(
            next_segment("00000003000000A20000003F", 64 << 20).as_deref(),
            Some("00000003000000A300000000")
        );
        assert_eq!(
            next_segment("0000000100000000000000FE", 1 << 20).as_deref(),
            Some("0000000100000000000000FF")
        );
        assert_eq!(next_segment("00000002.history", m16), None);
        assert_eq!(next_segment("000000010000000000000001", 1000), None);
    }

    #[test]
    fn history_files_go_first() {
        let mut v = vec![
            "000000020000000000000005",
            "00000002.history",
            "000000010000000000000004.partial",
            "000000010000000000000003",
        ];
        v.sort_by(|a, b| priority(a).cmp(&priority(b)));
        assert_eq!(
            v,
            [
                "00000002.history",
                "000000010000000000000003",
                "000000010000000000000004.partial",
                "000000020000000000000005"
            ]
        );
    }
}
