//! The built-in hostinfo port (`org.hostinfo.0`): one JSON document of host facts, built
//! fresh each time the guest opens the port. Hand-written JSON (no serde in the workspace).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Port name of the hostinfo channel.
pub const PORT_NAME: &str = "org.hostinfo.0";

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// JSON string literal with escapes.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The host's name as the kernel reports it.
pub fn hostname() -> String {
    read_trim("/proc/sys/kernel/hostname")
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// UTC time as RFC 3339.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Builds the document (one line of JSON followed by a newline).
pub fn document() -> Vec<u8> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let load = read_trim("/proc/loadavg");
    let loads: Vec<&str> = load.split_whitespace().take(3).collect();
    let load_json = if loads.len() == 3 && loads.iter().all(|l| l.parse::<f64>().is_ok()) {
        format!("[{}]", loads.join(", "))
    } else {
        "null".into()
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut s = String::from("{");
    let _ = write!(
        s,
        "\"hostname\": {}, \"kernel\": {}, \"kernel_version\": {}, \"cpu_model\": {}, \
         \"cpu_count\": {cpus}, \"mem_total_bytes\": {}, \"mem_available_bytes\": {}, \
         \"loadavg\": {load_json}, \"backend\": \"serial-backend\", \"backend_version\": {}, \
         \"time_unix\": {now}, \"time\": {}",
        json_str(&hostname()),
        json_str(&read_trim("/proc/sys/kernel/osrelease")),
        json_str(&read_trim("/proc/sys/kernel/version")),
        json_str(&cpu_model),
        meminfo_bytes(&meminfo, "MemTotal"),
        meminfo_bytes(&meminfo, "MemAvailable"),
        json_str(env!("CARGO_PKG_VERSION")),
        json_str(&rfc3339(now)),
    );
    s.push_str("}\n");
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_the_facts() {
        let d = String::from_utf8(document()).unwrap();
        assert!(d.ends_with("}\n"));
        assert!(d.contains(&format!("\"hostname\": {}", json_str(&hostname()))));
        assert!(d.contains("\"cpu_count\": "));
        assert!(d.contains("\"mem_total_bytes\": "));
    }

    #[test]
    fn escapes_and_dates() {
        assert_eq!(json_str("a\"b\\\n\u{1}"), "\"a\\\"b\\\\\\n\\u0001\"");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
