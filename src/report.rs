//! Where hail's words go: log records (the journal when stderr is connected
//! to it, plain lines otherwise) and `STATUS=` for systemd.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Sets up logging for one profile: every record names it, as a
/// `HAIL_PROFILE=` field in the journal or a `[profile]` prefix on stderr.
pub fn init(profile: Option<&str>, job_uri: Option<&str>) {
    let level = match std::env::var("HAIL_LOG").as_deref() {
        Ok("debug") => LevelFilter::Debug,
        Ok("warn") => LevelFilter::Warn,
        _ => LevelFilter::Info,
    };
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
            if journal.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    let prefix = match profile {
        Some(profile) => format!("hail[{profile}]: "),
        None => "hail: ".into(),
    };
    if log::set_boxed_logger(Box::new(StderrLog { prefix })).is_ok() {
        log::set_max_level(level);
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
