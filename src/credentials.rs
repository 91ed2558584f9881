//! HTTP Basic credentials from a netrc file, for the job URI's host only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use netrc_rs::Netrc;

use crate::hydra::Credentials;

/// Used when `--netrc-file` is not given, if it exists.
pub const DEFAULT_NETRC: &str = "/etc/netrc";

/// The credentials for `host`: the netrc's `machine host` entry, else its
/// `default` entry. An explicitly named file must exist and parse; a missing
/// default file means no credentials.
pub fn for_host(explicit: Option<&Path>, host: &str) -> Result<Option<Credentials>> {
    let path = match explicit {
        Some(path) => path,
        None if Path::new(DEFAULT_NETRC).exists() => Path::new(DEFAULT_NETRC),
        None => return Ok(None),
    };
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read netrc file {} (given with --netrc-file or HAIL_NETRC_FILE)",
            path.display()
        )
    })?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "netrc file {} is readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let netrc = Netrc::parse(text, false).map_err(|err| {
        // netrc-rs's message quotes the offending token, which may be part
        // of a password (one with a space): only where it is.
        let at = match err {
            netrc_rs::Error::EOF => "it ends in the middle of an entry".to_owned(),
            netrc_rs::Error::IllegalFormat(netrc_rs::Position(line, column), _) => {
                format!(
                    "an unexpected word at line {line}, column {column}; netrc values cannot \
                     contain spaces"
                )
            }
        };
        anyhow!(
            "netrc file {} is malformed ({at}); fix it or point --netrc-file elsewhere",
            path.display()
        )
    })?;
    Ok(lookup(&netrc, host))
}

fn lookup(netrc: &Netrc, host: &str) -> Option<Credentials> {
    // Hosts in URLs are case-insensitive; netrc entries are written by hand.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let named = netrc.machines.iter().find(|m| {
        m.name.as_deref().is_some_and(|name| {
            name.trim_start_matches('[')
                .trim_end_matches(']')
                .eq_ignore_ascii_case(host)
        })
    });
    let machine = named.or_else(|| netrc.machines.iter().find(|m| m.name.is_none()))?;
    Some(Credentials {
        login: machine.login.clone().unwrap_or_default(),
        password: machine.password.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Netrc {
        Netrc::parse(text, false).unwrap()
    }

    #[test]
    fn machine_entry_wins_over_default() {
        let netrc = parse(
            "default login anon password x\nmachine hydra.example.org login ci password s3cret\n",
        );
        let creds = lookup(&netrc, "Hydra.Example.org").unwrap();
        assert_eq!(
            (creds.login.as_str(), creds.password.as_str()),
            ("ci", "s3cret")
        );
        let creds = lookup(&netrc, "other.example.org").unwrap();
        assert_eq!(creds.login, "anon");
    }

    #[test]
    fn no_entry_no_credentials() {
        let netrc = parse("machine hydra.example.org login ci password s3cret\n");
        assert!(lookup(&netrc, "evil.example.org").is_none());
    }

    #[test]
    fn debug_never_shows_the_password() {
        let netrc = parse("machine h login ci password s3cret\n");
        let creds = lookup(&netrc, "h").unwrap();
        assert!(!format!("{creds:?}").contains("s3cret"));
    }
}
