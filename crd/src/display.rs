//! How durations are shown to people, the same in `pretrain status` and in the stages' progress.

/// `1h02m` from an hour on, `4m05s` below it.
pub fn duration(seconds: u64) -> String {
    let s = seconds;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, s % 3600 / 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn minutes_below_an_hour_then_hours() {
        assert_eq!(super::duration(0), "0m00s");
        assert_eq!(super::duration(245), "4m05s");
        assert_eq!(super::duration(3720), "1h02m");
        assert_eq!(super::duration(90_000), "25h00m");
    }
}
