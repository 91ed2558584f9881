//! Where hail's words go: log records (the journal when stderr is connected
//! to it, plain lines otherwise) and `STATUS=` for systemd.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Sets up logging for one profile: every record names it, as a
/// `HAIL_PROFILE=` field in the journal or a `[profile]` prefix on stderr.
/// `HAIL_LOG` sets the level (error, warn, info, debug, trace; default info).
pub fn init(profile: Option<&str>, job_uri: Option<&str>) {
    let requested = std::env::var("HAIL_LOG").ok().filter(|v| !v.is_empty());
    let parsed = requested.as_deref().map(str::parse::<LevelFilter>);
    let level = match parsed {
        Some(Ok(level)) => level,
        _ => LevelFilter::Info,
    };
    install(profile, job_uri);
    log::set_max_level(level);
    if let (Some(requested), Some(Err(_))) = (requested, parsed) {
        log::warn!(
            "HAIL_LOG={requested:?} is not a log level (error, warn, info, debug, trace); using info"
        );
    }
}

fn install(profile: Option<&str>, job_uri: Option<&str>) {
    if systemd_journal_logger::connected_to_journal() {
        let mut fields = Vec::new();
        if let Some(profile) = profile {
            fields.push(("HAIL_PROFILE", profile.to_owned()));
        }
        if let Some(job_uri) = job_uri {
            fields.push(("HAIL_JOB_URI", job_uri.to_owned()));
        }
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let journal = journal
                .with_extra_fields(fields)
                .with_syslog_identifier("hail".into());
            if log::set_boxed_logger(Box::new(OwnRecords(journal))).is_ok() {
                return;
            }
        }
    }
    let prefix = match profile {
        Some(profile) => format!("hail[{profile}]: "),
        None => "hail: ".into(),
    };
    let _ = log::set_boxed_logger(Box::new(OwnRecords(StderrLog { prefix })));
}

/// Passes on hail's own records only: a library's (say the TLS verifier's
/// error about a certificate) would repeat what hail's one error says.
struct OwnRecords<L>(L);

impl<L: Log> Log for OwnRecords<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("hail") && self.0.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

struct StderrLog {
    prefix: String,
}

impl Log for StderrLog {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let level = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            _ => "",
        };
        let _ = writeln!(
            std::io::stderr().lock(),
            "{}{level}{}",
            self.prefix,
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Tells systemd what the pass is doing (`systemctl status` shows it);
/// a no-op outside a unit.
pub fn status(what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(what)]);
    }
}

/// Journal `MESSAGE_ID`s, one per kind of event, so that
/// `journalctl MESSAGE_ID=…` finds every such event on a host.
pub mod message_id {
    /// hail starts deploying a build (realise, switch, activate).
    pub const DEPLOYING: &str = "657c27ae229f4b18a640c11d7ba911db";
    /// A build was deployed and activated.
    pub const DEPLOYED: &str = "251f8a6c551b4b19b4be55e60031ffc1";
    /// The profile already was at Hydra's latest build.
    pub const UP_TO_DATE: &str = "46bbe7bae8fb484ab2b15bf5fc5c4cc1";
    /// A build's activate failed.
    pub const ACTIVATION_FAILED: &str = "3ae9cc2b13824065822447e427e83f74";
    /// The profile was put back to its previous generation (or removed).
    pub const ROLLED_BACK: &str = "896b2940203e46dcbc031352a55f528d";
    /// hail holds off: an operator rolled back, or a build is too young.
    pub const HELD: &str = "65de339cb6074b3fb9feb53b1303be1b";
    /// The pass failed (the message says why).
    pub const ERROR: &str = "882b1e906bcc447aa9697b1e6b85d52d";
    /// A NixOS system needs a reboot (required, or pending for hail), or
    /// hail reboots the host.
    pub const REBOOT: &str = "a3cf4e827f344b13a9fb8da7e370d5c4";
}

/// `2026-11-25T22:05:09Z` (RFC 3339, UTC) for a Unix time; a time past the
/// year 9999 (only a damaged state file has one) as the number itself.
pub fn utc(secs: u64) -> String {
    const LAST_RFC3339_SECOND: u64 = 253_402_300_799;
    if secs > LAST_RFC3339_SECOND {
        return format!("{secs} (Unix time)");
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// The build a journal record is about: `HAIL_BUILD_ID` (when known) and
/// `HAIL_STORE_PATH` fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct About<'a> {
    pub build_id: Option<u64>,
    pub store_path: Option<&'a str>,
}

impl<'a> About<'a> {
    pub fn build(build_id: u64, store_path: &'a str) -> Self {
        Self {
            build_id: Some(build_id),
            store_path: Some(store_path),
        }
    }
}

/// Logs one event with its `MESSAGE_ID` and the fields of the build it is about.
pub fn event(level: Level, id: &str, about: About<'_>, message: std::fmt::Arguments<'_>) {
    match (about.build_id, about.store_path) {
        (Some(build_id), Some(store_path)) => log::log!(
            level,
            message_id = id,
            hail_build_id = build_id,
            hail_store_path = store_path;
            "{message}"
        ),
        (None, Some(store_path)) => log::log!(
            level,
            message_id = id,
            hail_store_path = store_path;
            "{message}"
        ),
        (Some(build_id), None) => log::log!(
            level,
            message_id = id,
            hail_build_id = build_id;
            "{message}"
        ),
        (None, None) => log::log!(level, message_id = id; "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_220), "2023-11-14T22:17:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(u64::MAX), "18446744073709551615 (Unix time)");
    }
}
