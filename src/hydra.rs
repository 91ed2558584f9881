//! The Hydra client: the only code that speaks HTTP.
//!
//! A pass is one exchange: `GET JOB/latest` (answered with a 302 that we do
//! not follow) and `GET BASE/build/ID`, both on the job URI's own origin
//! whatever the `Location` header says, so credentials never leave it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, Unexpected, Visitor};
use serde::{Deserialize, Serialize};
use ureq::Agent;
use ureq::http::{Response, StatusCode, Uri, header};

use crate::state;
use crate::store_path::{StoreDir, StorePath};

/// Hydra's answers are a few KiB; anything this large is not Hydra.
pub const MAX_BODY: u64 = 1024 * 1024;
/// `/eval/ID/builds` lists every build of an evaluation, about 1.5 KiB each,
/// and `/jobset/P/J/evals` the ids of all of them for 20 evaluations (over
/// 1 MiB a page on large jobsets).
const MAX_EVALS_BODY: u64 = 64 * 1024 * 1024;
/// `--wait-for-jobset` reads at most this many pages of evaluations (20 each)…
pub const MAX_EVAL_PAGES: usize = 3;
/// …and the builds of at most this many evaluations.
pub const MAX_EVALS_CHECKED: usize = 10;
/// How long `--wait-for-jobset` trusts that an evaluation has failed builds:
/// Hydra's operators restart failed builds, which may then succeed.
const FAILED_VERDICT_LIFETIME: u64 = 3600;
const EXPECTED_JOB_URI: &str = "http(s)://HOST[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB";

/// A Hydra job URI, validated and split into the parts hail needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUri {
    /// `http` or `https`.
    pub scheme: String,
    /// Host as written (lower-cased), without port; IPv6 keeps its brackets.
    pub host: String,
    pub port: u16,
    /// `scheme://authority/prefix`: where Hydra's other endpoints live.
    pub base: String,
    pub project: String,
    pub jobset: String,
    pub job: String,
}

impl JobUri {
    /// Validates a job URI. The error never repeats credentials written into
    /// it: it ends up in logs.
    pub fn parse(uri: &str) -> Result<Self, String> {
        // Hydra's project, jobset and job names never contain an '@'.
        if uri.contains('@') {
            return Err(format!(
                "{:?} carries credentials; put them in a netrc file (--netrc-file) instead",
                without_credentials(uri)
            ));
        }
        let expected = || format!("{uri:?} is not a Hydra job URI; expected {EXPECTED_JOB_URI}");
        if uri
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "?#\\".contains(c))
        {
            return Err(format!("{} (no spaces, query or fragment)", expected()));
        }
        let parsed: Uri = uri.parse().map_err(|_| expected())?;
        let Origin { scheme, host, port } = origin(&parsed).ok_or_else(expected)?;
        let authority = parsed.authority().ok_or_else(expected)?;
        let path = parsed.path().trim_end_matches('/');
        let at = path.rfind("/job/").ok_or_else(expected)?;
        let (prefix, job_part) = (&path[..at], &path[at + "/job/".len()..]);
        let parts: Vec<&str> = job_part.split('/').collect();
        let [project, jobset, job] = parts[..] else {
            return Err(expected());
        };
        if [project, jobset, job].iter().any(|p| p.is_empty()) {
            return Err(expected());
        }
        Ok(Self {
            base: format!("{scheme}://{authority}{prefix}"),
            scheme,
            host,
            port,
            project: project.into(),
            jobset: jobset.into(),
            job: job.into(),
        })
    }

    /// The job's own URL, normalised (no trailing slash).
    pub fn url(&self) -> String {
        format!(
            "{}/job/{}/{}/{}",
            self.base, self.project, self.jobset, self.job
        )
    }

    pub fn latest_url(&self) -> String {
        format!("{}/latest", self.url())
    }

    /// Another job of the same jobset: its `latest` redirect.
    pub fn sibling_latest_url(&self, job: &str) -> String {
        format!(
            "{}/job/{}/{}/{job}/latest",
            self.base, self.project, self.jobset
        )
    }

    /// This job's build in evaluation `eval` (a redirect).
    pub fn eval_job_url(&self, eval: u64) -> String {
        format!("{}/eval/{eval}/job/{}", self.base, self.job)
    }

    pub fn build_url(&self, id: u64) -> String {
        format!("{}/build/{id}", self.base)
    }

    pub fn evals_url(&self, page: usize) -> String {
        format!(
            "{}/jobset/{}/{}/evals?page={page}",
            self.base, self.project, self.jobset
        )
    }

    /// Hydra's newest evaluation with no unfinished builds (a redirect).
    pub fn latest_eval_url(&self) -> String {
        format!(
            "{}/jobset/{}/{}/latest-eval",
            self.base, self.project, self.jobset
        )
    }

    pub fn eval_builds_url(&self, eval: u64) -> String {
        format!("{}/eval/{eval}/builds", self.base)
    }
}

impl fmt::Display for JobUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// Where a URL points: what makes two URLs the same origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `http` or `https`.
    pub scheme: String,
    /// Lower-cased; IPv6 keeps its brackets.
    pub host: String,
    pub port: u16,
}

/// The origin of an absolute http(s) URL without credentials. ureq's URI
/// parser also accepts user info, an empty or non-numeric port (as no port)
/// and hosts of any characters: none of them are Hydra's.
fn origin(uri: &Uri) -> Option<Origin> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = uri.authority()?.as_str();
    let host = uri.host()?;
    let valid_host = host.len() > 2 && host.starts_with('[')
        || !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
    if authority.contains('@') || !valid_host {
        return None;
    }
    let port = match authority.get(host.len()..)? {
        "" => default_port,
        port => port.strip_prefix(':')?.parse().ok().filter(|p| *p != 0)?,
    };
    Some(Origin {
        scheme,
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// `uri` with what stands between its scheme and its last `@` (a user and
/// password) replaced by `…`.
fn without_credentials(uri: &str) -> String {
    let scheme_end = uri
        .split_once("://")
        .filter(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
        .map_or(0, |(scheme, _)| scheme.len() + "://".len());
    match uri.rfind('@') {
        Some(at) if at >= scheme_end => format!("{}…{}", &uri[..scheme_end], &uri[at..]),
        _ => uri.to_owned(),
    }
}

/// HTTP Basic credentials for the job URI's host.
#[derive(Clone)]
pub struct Credentials {
    pub login: String,
    pub password: String,
}

impl Credentials {
    fn header_value(&self) -> String {
        let raw = format!("{}:{}", self.login, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never let a password reach a log line by accident.
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// How long each HTTP exchange may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

impl Timeouts {
    pub const DEFAULT: Self = Self {
        connect: Duration::from_secs(10),
        request: Duration::from_secs(60),
    };

    /// `--timeout SECS`: the whole request, and the connect phase within it.
    pub fn total(request: Duration) -> Self {
        Self {
            connect: request.min(Self::DEFAULT.connect),
            request,
        }
    }
}

/// A successful Hydra build with the output hail deploys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub id: u64,
    pub out_path: StorePath,
    /// When the build finished (Unix time). `None` means the age is unknown:
    /// Hydra sent no `stoptime`, `null`, or something that is not a time.
    pub stoptime: Option<u64>,
    pub system: String,
}

/// Which of the job's builds to deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// `JOB/latest`: the highest successful build id, any system.
    Latest,
    /// `JOB/latest-for/SYSTEM`.
    LatestFor(String),
    /// `JOB/latest-finished`: from an evaluation with no unfinished builds.
    LatestFinished,
    /// This job's build in the newest evaluation whose builds all
    /// finished successfully, optionally for one system.
    WholeJobset { system: Option<String> },
    /// This job's build from the evaluation of the gate job's latest
    /// successful build (an aggregate job that succeeds only when all its
    /// constituents do).
    Gated { gate: String },
}

impl fmt::Display for Selection {
    /// The endpoint or mode, for records: `latest`, `latest-for/SYSTEM`, …
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::LatestFor(system) => write!(f, "latest-for/{system}"),
            Self::LatestFinished => f.write_str("latest-finished"),
            Self::WholeJobset { system: None } => f.write_str("wait-for-jobset"),
            Self::WholeJobset {
                system: Some(system),
            } => write!(f, "wait-for-jobset/{system}"),
            Self::Gated { gate } => write!(f, "gate-job/{gate}"),
        }
    }
}

/// Hydra's answer to "which build?".
#[derive(Debug)]
pub enum Latest {
    /// The build the caller said it has (its id is all Hydra was asked).
    Unchanged(u64),
    Build(Build),
}

/// What a [`Client`] asks Hydra for, and how.
pub struct ClientConfig {
    pub job: JobUri,
    /// Sent to the job URI's origin only.
    pub credentials: Option<Credentials>,
    pub timeouts: Timeouts,
    pub store: StoreDir,
    pub selection: Selection,
    /// The build output to deploy (`--output`).
    pub output: String,
}

pub struct Client {
    agent: Agent,
    job: JobUri,
    authorization: Option<String>,
    store: StoreDir,
    selection: Selection,
    output: String,
}

impl Client {
    pub fn new(
        ClientConfig {
            job,
            credentials,
            timeouts,
            store,
            selection,
            output,
        }: ClientConfig,
    ) -> Result<Self> {
        let mut config = Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(timeouts.connect))
            .timeout_global(Some(timeouts.request))
            .user_agent(concat!("hail/", env!("CARGO_PKG_VERSION")));
        // Loading the trust store costs a few ms; an http job URI never needs it.
        if job.scheme == "https" {
            config = config.tls_config(tls_config()?);
        }
        Ok(Self {
            agent: config.build().into(),
            authorization: credentials.map(|c| c.header_value()),
            job,
            store,
            selection,
            output,
        })
    }

    pub fn job(&self) -> &JobUri {
        &self.job
    }

    /// The build to deploy, as the selection says: for the `latest`
    /// endpoints, Hydra's redirect, then the build it names, fetched from
    /// the job URI's own origin.
    ///
    /// With `known`, the id of the build the caller has deployed with the same
    /// [`Client::source`], a redirect to that id ends the exchange: one small
    /// request when nothing changed.
    ///
    /// `--wait-for-jobset` remembers what it judged in an [`EvalMemo`]: given
    /// the last one, it reads no evaluation twice, and while Hydra's newest
    /// finished evaluation is the same, one small request is all it sends.
    /// The memo to keep comes back with the answer, an error included.
    pub fn latest(
        &self,
        known: Option<u64>,
        memo: Option<&EvalMemo>,
    ) -> (Result<Latest>, Option<EvalMemo>) {
        let endpoint = match &self.selection {
            Selection::WholeJobset { system } => {
                let (choice, memo) = self.whole_jobset_build(system.as_deref(), memo);
                let latest = choice.and_then(|choice| match choice {
                    Choice::Build(build) => Ok(Latest::Build(build)),
                    Choice::Id(id) if known == Some(id) => Ok(Latest::Unchanged(id)),
                    Choice::Id(id) => self.build(id).map(Latest::Build),
                });
                return (latest, memo);
            }
            Selection::Gated { gate } => return self.gated_build(gate, known, memo),
            redirecting => redirecting.to_string(),
        };
        let url = format!("{}/{endpoint}", self.job.url());
        let latest = self.redirect_target(&url, "build").and_then(|id| {
            if known == Some(id) {
                return Ok(Latest::Unchanged(id));
            }
            self.build(id).map(Latest::Build)
        });
        (latest, None)
    }

    /// Whether Hydra answers the pass's first request as it should (a
    /// redirect to a build, or for `--wait-for-jobset` to an evaluation),
    /// whichever build it names: after a NixOS switch, the proof that the
    /// host can still reach Hydra. A newer build that could not be deployed
    /// is no reason to call Hydra unreachable, and neither is Hydra's own
    /// failure (5xx: a restart, its database): the host got an answer from
    /// it, so the new system did not cut it off.
    pub fn confirm_reachable(&self) -> Result<()> {
        let (url, kind) = match &self.selection {
            Selection::WholeJobset { .. } => (self.job.latest_eval_url(), "eval"),
            Selection::Gated { gate } => (self.job.sibling_latest_url(gate), "build"),
            redirecting => (format!("{}/{redirecting}", self.job.url()), "build"),
        };
        let response = self.head(&url)?;
        let status = response.status();
        if status.is_server_error() {
            log::info!(
                "Hydra answered {url} with {status}: it is failing, but the host reaches it"
            );
            return Ok(());
        }
        if self.redirect_id(&url, &response, kind)?.is_some() {
            return Ok(());
        }
        // Another answer: the usual request, for Hydra's message.
        self.redirect_target(&url, kind).map(|_| ())
    }

    /// What a build id means here: the job, the selection and the output.
    /// Only a deployment made with the same source may skip `/build/ID`.
    pub fn source(&self) -> String {
        format!("{} {} {}", self.job, self.selection, self.output)
    }

    /// `--gate-job`: this job's build in the newest evaluation of the gate's
    /// latest successful build. Small exchanges only, whatever the jobset's
    /// size: the gate's `latest`, and while it names the build judged last
    /// time, nothing else; otherwise the gate's build (for its evaluations)
    /// and `/eval/N/job/JOB`.
    fn gated_build(
        &self,
        gate: &str,
        known: Option<u64>,
        memo: Option<&EvalMemo>,
    ) -> (Result<Latest>, Option<EvalMemo>) {
        let source = self.source();
        let memo = memo.filter(|m| m.source == source);
        let found = self
            .redirect_target(&self.job.sibling_latest_url(gate), "build")
            .with_context(|| format!("cannot find the gate job {gate}'s latest successful build"))
            .and_then(|gate_build| match memo.filter(|m| m.basis == gate_build) {
                // The same gate build as last time: the same build of ours.
                Some(EvalMemo {
                    chosen: Some(id), ..
                }) => Ok((gate_build, *id)),
                _ => self
                    .job_build_gated_by(gate, gate_build)
                    .map(|id| (gate_build, id)),
            });
        let (gate_build, id) = match found {
            Ok(found) => found,
            Err(err) => return (Err(err), memo.cloned()),
        };
        let next = EvalMemo {
            source,
            basis: gate_build,
            chosen: Some(id),
            ..EvalMemo::default()
        };
        let latest = if known == Some(id) {
            Ok(Latest::Unchanged(id))
        } else {
            self.build(id).map(Latest::Build)
        };
        (latest, Some(next))
    }

    /// This job's build in the newest evaluation that gate build `gate_build`
    /// belongs to.
    fn job_build_gated_by(&self, gate: &str, gate_build: u64) -> Result<u64> {
        let url = self.job.build_url(gate_build);
        let build: HydraBuild = self.get_json(&url, MAX_BODY, "a Hydra build")?;
        let eval = build.jobsetevals.iter().max().copied().ok_or_else(|| {
            anyhow!("the gate job {gate}'s build {gate_build} ({url}) belongs to no evaluation")
        })?;
        self.redirect_target(&self.job.eval_job_url(eval), "build")
            .with_context(|| {
                format!(
                    "the gate job {gate} succeeded in evaluation {eval} (build {gate_build}), but \
                     no build of {} was found there; is {} one of its constituents?",
                    self.job.job, self.job.job
                )
            })
    }

    /// `--wait-for-jobset`: the newest evaluation (of a bounded number) whose
    /// builds all finished successfully and that has a build of this job.
    fn whole_jobset_build(
        &self,
        system: Option<&str>,
        memo: Option<&EvalMemo>,
    ) -> (Result<Choice>, Option<EvalMemo>) {
        let source = self.source();
        let memo = memo.filter(|m| m.source == source);
        let newest_complete = match self.redirect_target(&self.job.latest_eval_url(), "eval") {
            Ok(eval) => eval,
            Err(err) => return (Err(err), memo.cloned()),
        };
        if let Some(memo) = memo.filter(|m| {
            m.basis == newest_complete && m.rejudge_at.is_none_or(|at| state::now() < at)
        }) {
            // Nothing was evaluated (and finished) since: the same answer.
            let choice = match (memo.chosen, &memo.waiting) {
                (Some(id), _) => Ok(Choice::Id(id)),
                (None, why) => Err(anyhow!("{why}")),
            };
            return (choice, Some(memo.clone()));
        }
        let mut next = EvalMemo {
            source,
            basis: newest_complete,
            chosen: None,
            waiting: String::new(),
            verdicts: memo.map(|m| m.verdicts.clone()).unwrap_or_default(),
            job_systems: memo.map(|m| m.job_systems.clone()).unwrap_or_default(),
            rejudge_at: None,
        };
        let choice = self.walk_evaluations(system, &mut next);
        match &choice {
            Ok(Choice::Build(build)) => next.chosen = Some(build.id),
            Ok(Choice::Id(id)) => next.chosen = Some(*id),
            Err(err) => next.waiting = format!("{err:#}"),
        }
        next.forget_old_verdicts();
        (choice, Some(next))
    }

    /// The newest evaluation (of a bounded number) whose builds all finished
    /// successfully and that has a build of this job; evaluations judged
    /// before are taken from `memo`, new finished ones added to it.
    fn walk_evaluations(&self, system: Option<&str>, memo: &mut EvalMemo) -> Result<Choice> {
        let mut read = EvalsRead::default();
        'pages: for page in 1..=MAX_EVAL_PAGES {
            let url = self.job.evals_url(page);
            let listing: EvalsPage =
                self.get_json(&url, MAX_EVALS_BODY, "a list of evaluations")?;
            for eval in listing.evals {
                if read.checked == MAX_EVALS_CHECKED {
                    read.more = true;
                    break 'pages;
                }
                read.checked += 1;
                let now = state::now();
                let known = match memo.verdicts.get(&eval.id) {
                    Some(Verdict::Deploy(id)) => return Ok(Choice::Id(*id)),
                    Some(Verdict::Skip(why)) => Some((why.clone(), None)),
                    Some(Verdict::Failed { why, at }) => at
                        .checked_add(FAILED_VERDICT_LIFETIME)
                        .filter(|until| now < *until)
                        .map(|until| (why.clone(), Some(until))),
                    None => None,
                };
                if let Some((why, until)) = known {
                    if let Some(until) = until {
                        memo.rejudge_at = Some(memo.rejudge_at.map_or(until, |t| t.min(until)));
                    }
                    read.skipped.push(format!("evaluation {} {why}", eval.id));
                    read.job_systems.extend(memo.job_systems.iter().cloned());
                    continue;
                }
                let builds: Vec<HydraBuild> = self.get_json(
                    &self.job.eval_builds_url(eval.id),
                    MAX_EVALS_BODY,
                    "a list of builds",
                )?;
                let systems: BTreeSet<String> = builds
                    .iter()
                    .filter(|b| b.job == self.job.job)
                    .map(|b| b.system.clone())
                    .collect();
                memo.job_systems.extend(systems.iter().cloned());
                read.job_systems.extend(systems);
                let finished = builds.iter().all(|b| b.finished);
                match eval_verdict(&builds, &self.job.job, system) {
                    EvalVerdict::Deploy(build) => {
                        memo.verdicts.insert(eval.id, Verdict::Deploy(build.id));
                        if !read.skipped.is_empty() {
                            log::info!(
                                "deploying from evaluation {}, not from the newer ones: {}",
                                eval.id,
                                read.skipped.join(", ")
                            );
                        }
                        return build
                            .deployable(build.id, &self.output, &self.store)
                            .map(Choice::Build)
                            .with_context(|| {
                                format!(
                                    "Hydra's build {} (in evaluation {}) cannot be deployed",
                                    build.id, eval.id
                                )
                            });
                    }
                    EvalVerdict::Failed(why) => {
                        let until = now.saturating_add(FAILED_VERDICT_LIFETIME);
                        memo.rejudge_at = Some(memo.rejudge_at.map_or(until, |t| t.min(until)));
                        memo.verdicts.insert(
                            eval.id,
                            Verdict::Failed {
                                why: why.clone(),
                                at: now,
                            },
                        );
                        read.skipped.push(format!("evaluation {} {why}", eval.id));
                    }
                    EvalVerdict::Skip(why) => {
                        // Only a finished evaluation's verdict is final.
                        if finished {
                            memo.verdicts.insert(eval.id, Verdict::Skip(why.clone()));
                        }
                        read.skipped.push(format!("evaluation {} {why}", eval.id));
                    }
                }
            }
            if listing.next.is_none() {
                break;
            }
        }
        Err(self.no_whole_jobset(&read, system))
    }

    /// Why `--wait-for-jobset` found nothing to deploy: a job or system that
    /// the evaluations do not have is a mistake to fix, the rest is waiting.
    fn no_whole_jobset(&self, read: &EvalsRead, system: Option<&str>) -> anyhow::Error {
        let JobUri {
            project,
            jobset,
            job,
            ..
        } = &self.job;
        let checked = read.checked;
        if checked == 0 {
            return anyhow!(
                "no evaluation of jobset {project}/{jobset} has finished with every build \
                 successful and a build of {job} (it has no evaluations); waiting for one"
            );
        }
        if read.job_systems.is_empty() {
            return anyhow!(
                "jobset {project}/{jobset} has no job {job} in its newest {checked} evaluations; \
                 check the job name in the job URI"
            );
        }
        if let Some(system) = system
            && !read.job_systems.contains(system)
        {
            return anyhow!(
                "jobset {project}/{jobset} has no build of {job} for {system} in its newest \
                 {checked} evaluations (only for {}); check --system",
                read.job_systems
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let which = if read.more {
            format!("none of the newest {checked} evaluations")
        } else {
            "no evaluation".to_owned()
        };
        anyhow!(
            "{which} of jobset {project}/{jobset} finished with every build successful and a \
             build of {job}{} ({}); waiting for one",
            system.map(|s| format!(" for {s}")).unwrap_or_default(),
            read.skipped.join(", ")
        )
    }

    /// `GET url` answered 200 with JSON that is `what` (a `T`).
    fn get_json<T: DeserializeOwned>(&self, url: &str, limit: u64, what: &str) -> Result<T> {
        let mut response = self.get(url)?;
        let body = read_body(&mut response, url, limit)?;
        let status = response.status();
        if status != StatusCode::OK {
            let location = location(&response);
            return Err(self.status_error(url, status, &response, &body, location));
        }
        if is_html(&response) {
            bail!(
                "Hydra answered {url} with HTML instead of JSON (does a proxy drop the \
                 'Accept: application/json' header?)"
            );
        }
        serde_json::from_slice(&body).map_err(|err| {
            if err.is_data() {
                anyhow!(
                    "Hydra's answer to {url} is not {what}: {}",
                    shorten(&err.to_string())
                )
            } else {
                anyhow!(
                    "Hydra's answer to {url} is not valid JSON ({err}): {}",
                    quote_bytes(&body)
                )
            }
        })
    }

    /// Follows nothing: reads the build id out of the 302 that Hydra's
    /// `latest` endpoints answer with.
    /// The id in the redirect Hydra answers `url` with: `…/KIND/ID` (a
    /// build for the `latest` endpoints, an evaluation for `latest-eval`).
    fn redirect_target(&self, url: &str, kind: &str) -> Result<u64> {
        // HEAD: the redirect is all hail needs, and without Hydra's "Moved"
        // page a no-change pass stays one answer of about 300 bytes.
        let response = self.head(url)?;
        if let Some(id) = self.redirect_id(url, &response, kind)? {
            return Ok(id);
        }
        // Not a redirect: Hydra's error body says why, so ask again with GET.
        let mut response = self.get(url)?;
        if let Some(id) = self.redirect_id(url, &response, kind)? {
            return Ok(id);
        }
        let body = read_body(&mut response, url, MAX_BODY)?;
        Err(self.status_error(
            url,
            response.status(),
            &response,
            &body,
            location(&response),
        ))
    }

    /// The build id a `latest` redirect names; `None` if `response` is no
    /// redirect (an error answer).
    fn redirect_id(
        &self,
        url: &str,
        response: &Response<ureq::Body>,
        kind: &str,
    ) -> Result<Option<u64>> {
        let status = response.status();
        let (
            StatusCode::FOUND | StatusCode::SEE_OTHER | StatusCode::TEMPORARY_REDIRECT,
            Some(location),
        ) = (status, location(response))
        else {
            return Ok(None);
        };
        let (id, origin) = id_from_location(&location, kind).ok_or_else(|| {
            anyhow!(
                "Hydra answered {url} with {status} to {location:?}, which is not a Hydra \
                 {kind} URL (…/{kind}/ID)"
            )
        })?;
        if kind == "build" && origin.is_some_and(|o| !self.same_origin(&o)) {
            log::warn!(
                "Hydra redirected to {location}, which is not on the job URI's origin; \
                 fetching build {id} from {} instead (check the reverse proxy's \
                 X-Forwarded-Host/-Proto headers)",
                self.job.build_url(id)
            );
        }
        Ok(Some(id))
    }

    /// `GET BASE/build/ID`, validated into a deployable [`Build`].
    fn build(&self, id: u64) -> Result<Build> {
        let url = self.job.build_url(id);
        let build: HydraBuild = self.get_json(&url, MAX_BODY, "a Hydra build")?;
        build
            .deployable(id, &self.output, &self.store)
            .with_context(|| format!("Hydra's build {id} ({url}) cannot be deployed"))
    }

    fn get(&self, url: &str) -> Result<Response<ureq::Body>> {
        self.call(self.agent.get(url), url)
    }

    fn head(&self, url: &str) -> Result<Response<ureq::Body>> {
        self.call(self.agent.head(url), url)
    }

    /// Sends `request` with the headers every request to Hydra carries.
    fn call(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
        url: &str,
    ) -> Result<Response<ureq::Body>> {
        let mut request = request.header(header::ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth);
        }
        request
            .call()
            .map_err(|err| describe_transport_error(err, url))
    }

    fn same_origin(&self, origin: &Origin) -> bool {
        (origin.scheme.as_str(), origin.host.as_str(), origin.port)
            == (
                self.job.scheme.as_str(),
                self.job.host.as_str(),
                self.job.port,
            )
    }

    fn status_error(
        &self,
        url: &str,
        status: StatusCode,
        response: &Response<ureq::Body>,
        body: &[u8],
        location: Option<String>,
    ) -> anyhow::Error {
        let hydra_says = hydra_error_message(response, body);
        let said = hydra_says
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        match status {
            StatusCode::MOVED_PERMANENTLY | StatusCode::PERMANENT_REDIRECT => anyhow!(
                "Hydra answered {url} with {status}{}: the job URI has moved (renamed jobset?); \
                 update --job-uri",
                location.map(|l| format!(" to {l:?}")).unwrap_or_default()
            ),
            StatusCode::NOT_FOUND => {
                let answered = format!("{url} answered {status}{said}");
                self.not_found(&answered, hydra_says.as_deref())
            }
            StatusCode::UNAUTHORIZED => anyhow!(
                "{url} requires credentials ({status}){said}: {}",
                if self.authorization.is_some() {
                    "the netrc entry for this host was refused; check its login and password"
                } else {
                    "add a netrc entry for this host and pass it with --netrc-file"
                }
            ),
            StatusCode::FORBIDDEN => anyhow!(
                "{url} refused access ({status}{said}): a Hydra with `private = 1` refuses every \
                 request without a login session and ignores HTTP Basic auth, even through a \
                 proxy, so no netrc entry can help; set `private = 0` and put a reverse proxy \
                 that authenticates (HTTP Basic, with --netrc-file) in front of Hydra and its cache"
            ),
            _ => {
                let what = if hydra_says.is_none() && is_html(response) {
                    " (an HTML page: a proxy error page, or the Accept header was dropped)"
                } else {
                    ""
                };
                anyhow!(
                    "unexpected answer from Hydra: {status} for {url}{}{said}{what}",
                    location
                        .map(|l| format!(" with Location {l:?}"))
                        .unwrap_or_default()
                )
            }
        }
    }

    /// Hydra answers 404 on the same endpoint for a missing jobset and for
    /// a job without a successful build; only its message tells them apart.
    fn not_found(&self, answered: &str, hydra_says: Option<&str>) -> anyhow::Error {
        let JobUri {
            project,
            jobset,
            job,
            ..
        } = &self.job;
        match hydra_says.and_then(Missing::from_message) {
            Some(Missing::Jobset) => {
                anyhow!(
                    "no such jobset {project}/{jobset} on Hydra ({answered}); check the job URI"
                )
            }
            Some(Missing::Project) => {
                anyhow!("no such project {project} on Hydra ({answered}); check the job URI")
            }
            Some(Missing::SuccessfulBuild) => {
                let system = match &self.selection {
                    Selection::LatestFor(system) => format!(" for {system}"),
                    _ => String::new(),
                };
                anyhow!(
                    "Hydra has no successful build of {job}{system} in jobset {project}/{jobset} \
                     ({answered}); wait for one, or check the job name (Hydra answers the same \
                     for a job it does not know)"
                )
            }
            None => anyhow!("nothing at {answered}; check the job URI"),
        }
    }
}

/// What Hydra's 404 messages say is missing.
#[derive(Debug, PartialEq, Eq)]
enum Missing {
    Jobset,
    Project,
    SuccessfulBuild,
}

impl Missing {
    /// `Jobset ‘J’ doesn't exist.`, `Project ‘P’ doesn't exist.`, `There is
    /// no successful build [for platform `S'] to redirect to.`
    fn from_message(message: &str) -> Option<Self> {
        if message.starts_with("There is no successful build") {
            Some(Self::SuccessfulBuild)
        } else if !message.ends_with(" doesn't exist.") {
            None
        } else if message.starts_with("Jobset ") {
            Some(Self::Jobset)
        } else if message.starts_with("Project ") {
            Some(Self::Project)
        } else {
            None
        }
    }
}

/// The Location header, if any, as text.
fn location(response: &Response<ureq::Body>) -> Option<String> {
    response
        .headers()
        .get(header::LOCATION)
        .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
}

fn describe_transport_error(err: ureq::Error, url: &str) -> anyhow::Error {
    match err {
        ureq::Error::Timeout(what) => anyhow!(
            "Hydra did not answer {url} in time ({what:?} timeout; raise --timeout if Hydra is slow)"
        ),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            anyhow!("cannot reach Hydra at {url}: connection refused (is Hydra up?)")
        }
        other => anyhow::Error::new(other).context(format!("cannot reach Hydra at {url}")),
    }
}

fn read_body(response: &mut Response<ureq::Body>, url: &str, limit: u64) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    // Read one byte past the limit to tell "exactly the limit" from "more".
    let reader = response.body_mut().as_reader();
    match reader.take(limit + 1).read_to_end(&mut body) {
        Ok(_) if body.len() as u64 > limit => {
            bail!("Hydra's answer to {url} is larger than {limit} bytes; refusing it")
        }
        Ok(_) => Ok(body),
        Err(err) => Err(anyhow::Error::new(err).context(format!(
            "Hydra's answer to {url} broke off (truncated or timed out)"
        ))),
    }
}

fn is_html(response: &Response<ureq::Body>) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/html"))
}

/// Hydra's error bodies in JSON mode.
#[derive(Deserialize)]
struct HydraError {
    error: String,
}

/// Hydra's `{"error": "..."}` message, if the body is one: on one line and
/// shortened, since it reaches the state, `hail status` and the journal.
fn hydra_error_message(response: &Response<ureq::Body>, body: &[u8]) -> Option<String> {
    if is_html(response) {
        return None;
    }
    serde_json::from_slice::<HydraError>(body).ok().map(|e| {
        let one_line: String = e
            .error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        shorten(&one_line)
    })
}

/// `…/build/123` (absolute or relative, any query) → (123, the origin if
/// the Location was absolute).
/// `…/KIND/123` (absolute or relative, any query) → (123, the origin if the
/// Location was absolute).
fn id_from_location(location: &str, kind: &str) -> Option<(u64, Option<Origin>)> {
    let uri: Uri = location.parse().ok()?;
    let origin = match uri.scheme() {
        Some(_) => Some(origin(&uri)?),
        None => None,
    };
    let (_, id) = uri.path().rsplit_once(&format!("/{kind}/"))?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((id.parse().ok()?, origin))
}

/// `GET /jobset/P/J/evals`: one page of evaluations, newest first.
#[derive(Deserialize)]
#[serde(expecting = "Hydra's list of evaluations {\"evals\": […], …}")]
struct EvalsPage {
    evals: Vec<EvalSummary>,
    /// Absent on the last page.
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(expecting = "an evaluation object")]
struct EvalSummary {
    id: u64,
}

/// A build object as Hydra sends it (`GET /build/ID`, and each of
/// `GET /eval/ID/builds`): the fields hail reads, checked as far as their
/// types go; [`HydraBuild::deployable`] checks the rest.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a Hydra build object")]
struct HydraBuild {
    #[serde(deserialize_with = "build_id")]
    id: u64,
    #[serde(deserialize_with = "zero_or_one")]
    finished: bool,
    /// `null` while unfinished.
    #[serde(deserialize_with = "build_status")]
    buildstatus: Option<i64>,
    /// Anything but a Unix time is `None`, so that a broken `stoptime`
    /// makes the age unknown, not the build undeployable.
    #[serde(default, deserialize_with = "unix_time")]
    stoptime: Option<u64>,
    job: String,
    system: String,
    buildoutputs: BTreeMap<String, BuildOutput>,
    /// The evaluations the build belongs to.
    #[serde(default)]
    jobsetevals: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "an output like {\"path\": \"/nix/store/…\"}")]
struct BuildOutput {
    /// `null` for a content-addressed derivation.
    #[serde(deserialize_with = "output_path")]
    path: Option<String>,
}

impl HydraBuild {
    /// This build as build `id` to deploy: finished, successful, and with a
    /// well-formed `output` path. Every complaint quotes what Hydra sent.
    fn deployable(&self, id: u64, output: &str, store: &StoreDir) -> Result<Build> {
        if self.id != id {
            bail!("its id is {}, not {id}", self.id);
        }
        if !self.finished {
            bail!("it has not finished yet (finished = 0)");
        }
        match self.buildstatus {
            Some(0) => {}
            Some(code) => bail!(
                "it did not succeed: buildstatus {code} ({})",
                build_status_meaning(code)
            ),
            None => bail!("its \"buildstatus\" is null, expected an integer"),
        }
        let out = self.buildoutputs.get(output).ok_or_else(|| {
            let names: Vec<&str> = self.buildoutputs.keys().map(String::as_str).collect();
            anyhow!("it has no output {output:?} (its outputs: {names:?}; --output chooses one)")
        })?;
        let Some(path) = &out.path else {
            bail!(
                "its output {output:?} has no path (a content-addressed derivation): Hydra cannot \
                 tell which store path to deploy"
            );
        };
        let out_path = store.parse(path).map_err(|why| {
            anyhow!(
                "its output path {:?} is not a valid store path: {why}",
                shorten(path)
            )
        })?;
        Ok(Build {
            id: self.id,
            out_path,
            stoptime: self.stoptime,
            system: self.system.clone(),
        })
    }
}

/// Hydra's integer fields, or `null`; `expecting` says which field and what
/// it must be, so that serde's error names it.
struct IntegerOrNull(&'static str);

impl<'de> Visitor<'de> for IntegerOrNull {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        i64::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An integer field that must not be `null`.
fn integer<'de, D: Deserializer<'de>>(d: D, expected: &'static str) -> Result<i64, D::Error> {
    d.deserialize_any(IntegerOrNull(expected))?
        .ok_or_else(|| de::Error::invalid_type(Unexpected::Unit, &expected))
}

fn build_id<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    const EXPECTED: &str = "\"id\" as a build number";
    let id = integer(d, EXPECTED)?;
    u64::try_from(id).map_err(|_| de::Error::invalid_value(Unexpected::Signed(id), &EXPECTED))
}

/// Hydra's `finished` is an integer, not the boolean its API description says.
fn zero_or_one<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    const EXPECTED: &str = "\"finished\" as the integer 0 or 1";
    match integer(d, EXPECTED)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(de::Error::invalid_value(
            Unexpected::Signed(other),
            &EXPECTED,
        )),
    }
}

fn build_status<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(IntegerOrNull("\"buildstatus\" as an integer or null"))
}

fn unix_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Time {
        Known(u64),
        Unknown(IgnoredAny),
    }
    Ok(match Time::deserialize(d)? {
        Time::Known(time) => Some(time),
        Time::Unknown(_) => None,
    })
}

/// A string, or `null`.
struct StringOrNull(&'static str);

impl<'de> Visitor<'de> for StringOrNull {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

fn output_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(StringOrNull(
        "\"path\" as a store path, or null for a content-addressed derivation",
    ))
}

enum EvalVerdict<'a> {
    Deploy(&'a HydraBuild),
    /// Failed builds, which a restart may yet mend.
    Failed(String),
    Skip(String),
}

/// Whether an evaluation's builds all finished successfully, and if so,
/// which of them is this job's (for `system`, if given).
fn eval_verdict<'a>(builds: &'a [HydraBuild], job: &str, system: Option<&str>) -> EvalVerdict<'a> {
    let unfinished = builds.iter().filter(|b| !b.finished).count();
    if unfinished > 0 {
        return EvalVerdict::Skip(format!("has {unfinished} unfinished builds"));
    }
    let failed = builds.iter().filter(|b| b.buildstatus != Some(0)).count();
    if failed > 0 {
        return EvalVerdict::Failed(format!("has {failed} failed builds"));
    }
    // Several systems' builds of the job: the highest id, as Hydra's `latest`.
    let ours = builds
        .iter()
        .filter(|b| b.job == job && system.is_none_or(|s| b.system == s))
        .max_by_key(|b| b.id);
    match (ours, system) {
        (Some(build), _) => EvalVerdict::Deploy(build),
        (None, Some(system)) if builds.iter().any(|b| b.job == job) => {
            EvalVerdict::Skip(format!("has no build of {job} for {system}"))
        }
        (None, _) => EvalVerdict::Skip(format!("has no build of {job}")),
    }
}

/// What `--wait-for-jobset` found: a build read with its evaluation, or
/// only the id of one judged before.
enum Choice {
    Build(Build),
    Id(u64),
}

/// What `--wait-for-jobset` judged, kept in the state between passes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalMemo {
    /// The [`Client::source`] it was judged for; another source starts afresh.
    pub source: String,
    /// What the choice was made from: Hydra's newest evaluation with no
    /// unfinished builds (`latest-eval`), or with `--gate-job` the gate's
    /// latest build.
    #[serde(alias = "newest_complete")]
    pub basis: u64,
    /// The build chosen then, or none (`waiting` says why).
    pub chosen: Option<u64>,
    pub waiting: String,
    /// Verdicts on finished evaluations, which do not change.
    pub verdicts: BTreeMap<u64, Verdict>,
    /// The systems the job was seen built for, for messages.
    pub job_systems: BTreeSet<String>,
    /// When a failed verdict the choice rests on is to be judged again.
    pub rejudge_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every build succeeded; this is the job's build.
    Deploy(u64),
    /// Why not, for good (no build of the job, or not for the system).
    Skip(String),
    /// Failed builds, judged at `at`: trusted for [`FAILED_VERDICT_LIFETIME`].
    Failed { why: String, at: u64 },
}

impl EvalMemo {
    /// Keeps the verdicts on the newest evaluations only: older ones are
    /// never read again.
    fn forget_old_verdicts(&mut self) {
        const KEPT: usize = 2 * MAX_EVALS_CHECKED;
        while self.verdicts.len() > KEPT {
            self.verdicts.pop_first();
        }
    }
}

/// What `--wait-for-jobset` read of the evaluations.
#[derive(Default)]
struct EvalsRead {
    checked: usize,
    /// More evaluations exist than were read.
    more: bool,
    /// Why each evaluation read was not deployed, newest first.
    skipped: Vec<String>,
    /// The systems the job has builds for in the evaluations read.
    job_systems: BTreeSet<String>,
}

fn build_status_meaning(code: i64) -> &'static str {
    match code {
        1 => "failed",
        2 => "dependency failed",
        3 | 9 => "aborted",
        4 => "cancelled",
        6 => "failed with output",
        7 => "timed out",
        10 => "log limit exceeded",
        11 => "output limit exceeded",
        12 => "non-deterministic",
        _ => "unknown status",
    }
}

const QUOTE_MAX: usize = 200;

fn quote_bytes(body: &[u8]) -> String {
    format!("{:?}", shorten(&String::from_utf8_lossy(body)))
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The roots hail trusts for https: the file `NIX_SSL_CERT_FILE` or
/// `SSL_CERT_FILE` names, as for nix, so a Hydra behind a private CA works
/// the same; otherwise the platform's trust store (rustls-platform-verifier:
/// on Linux, the distribution's CA bundle or `SSL_CERT_DIR`).
fn tls_config() -> Result<ureq::tls::TlsConfig> {
    let from_env = ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"]
        .iter()
        .find_map(|var| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(|v| (*var, PathBuf::from(v)))
        });
    let Some((var, file)) = from_env else {
        return Ok(ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build());
    };
    let pem = std::fs::read(&file).with_context(|| {
        format!(
            "cannot read CA certificates {} (from {var})",
            file.display()
        )
    })?;
    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        bail!("{} (from {var}) holds no PEM certificates", file.display());
    }
    Ok(ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn captured(name: &str) -> Value {
        let path = format!("{}/tests/data/hydra/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn decode<T: DeserializeOwned>(json: &Value) -> Result<T, String> {
        serde_json::from_str(&json.to_string()).map_err(|e| e.to_string())
    }

    /// What a pass makes of `json` served as `/build/ID`.
    fn deploy(json: &Value, id: u64, output: &str) -> Result<Build, String> {
        let store = StoreDir::new("/nix/store");
        decode::<HydraBuild>(json)?
            .deployable(id, output, &store)
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn job_uris() {
        let j = JobUri::parse("https://hydra.example.org/job/p/j/web").unwrap();
        assert_eq!(j.base, "https://hydra.example.org");
        assert_eq!((j.host.as_str(), j.port), ("hydra.example.org", 443));
        assert_eq!(
            j.latest_url(),
            "https://hydra.example.org/job/p/j/web/latest"
        );
        assert_eq!(j.build_url(4), "https://hydra.example.org/build/4");

        let j =
            JobUri::parse("http://127.0.0.1:3000/hydra/job/hail/main/agent.x86_64-linux/").unwrap();
        assert_eq!(j.base, "http://127.0.0.1:3000/hydra");
        assert_eq!(j.port, 3000);
        assert_eq!(j.job, "agent.x86_64-linux");
        assert_eq!(
            j.url(),
            "http://127.0.0.1:3000/hydra/job/hail/main/agent.x86_64-linux"
        );
        // --gate-job's exchanges, under the same prefix.
        assert_eq!(
            j.sibling_latest_url("tested"),
            "http://127.0.0.1:3000/hydra/job/hail/main/tested/latest"
        );
        assert_eq!(
            j.eval_job_url(7),
            "http://127.0.0.1:3000/hydra/eval/7/job/agent.x86_64-linux"
        );

        let j = JobUri::parse("http://[::1]:8080/job/a/b/c").unwrap();
        assert_eq!((j.host.as_str(), j.port), ("[::1]", 8080));

        let j = JobUri::parse("HTTPS://Hydra.Example.org/job/p/j/web").unwrap();
        assert_eq!(
            (j.scheme.as_str(), j.host.as_str()),
            ("https", "hydra.example.org")
        );

        for bad in [
            "",
            "hydra.example.org/job/p/j/web",
            "ftp://hydra/job/p/j/web",
            "https://hydra/job/p/j",
            "https://hydra/job/p/j/web/latest",
            "https://hydra/project/p",
            "https://hydra/job/p//web",
            "https:///job/p/j/web",
            "https://hydra:0/job/p/j/web",
            "https://hydra:x/job/p/j/web",
            "https://hydra:/job/p/j/web",
            "https://hydra:99999/job/p/j/web",
            "https://hy!dra/job/p/j/web",
            "https://user:pw@hydra/job/p/j/web",
            "https://hydra/job/p/j/web?x=1",
            "https://hydra/job/p/j/web#x",
            "https://hydra/job/p/j/we b",
        ] {
            assert!(JobUri::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn credentials_in_a_job_uri_are_refused_without_repeating_them() {
        for uri in [
            "https://ci:s3cret@hydra/job/p/j/web",
            "https://ci:s3c@ret@hydra/job/p/j/web",
            "https://ci:s3c/ret@hydra/job/p/j/web",
            "https://ci:s3c ret@hydra/job/p/j/web",
            "ci:s3cret@hydra/job/p/j/web",
            "ftp://ci:s3cret@hydra/job/p/j/web",
        ] {
            let err = JobUri::parse(uri).unwrap_err();
            assert!(err.contains("carries credentials"), "{uri}: {err}");
            assert!(!err.contains("s3c"), "{uri}: {err}");
        }
        assert_eq!(
            JobUri::parse("https://ci:s3cret@hydra/job/p/j/web").unwrap_err(),
            "\"https://…@hydra/job/p/j/web\" carries credentials; put them in a netrc file \
             (--netrc-file) instead"
        );
    }

    #[test]
    fn locations() {
        assert_eq!(
            id_from_location("https://hydra.example.org/build/4", "build"),
            Some((
                4,
                Some(Origin {
                    scheme: "https".into(),
                    host: "hydra.example.org".into(),
                    port: 443
                })
            ))
        );
        assert_eq!(
            id_from_location("/prefix/build/17?x=1", "build"),
            Some((17, None))
        );
        for bad in [
            "https://h/eval/4",
            "https://h/build/",
            "https://h/build/4/log",
            "https://h/build/-1",
            "https://h/build/4x",
            "https://h/xbuild/4",
            "https://u:p@h/build/4",
            "ftp://h/build/4",
            "build/4",
            "",
        ] {
            assert_eq!(id_from_location(bad, "build"), None, "{bad}");
        }
    }

    #[test]
    fn basic_auth_header() {
        // RFC 7617's example.
        let credentials = Credentials {
            login: "Aladdin".into(),
            password: "open sesame".into(),
        };
        assert_eq!(
            credentials.header_value(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn captured_answers_decode() {
        let page: EvalsPage = decode(&captured("evals.json")).unwrap();
        let ids: Vec<u64> = page.evals.iter().map(|e| e.id).collect();
        assert_eq!((ids, page.next), (vec![3, 2, 1], None));
        let page: EvalsPage = decode(&captured("evals-page2.json")).unwrap();
        assert!(page.evals.is_empty());

        let builds: Vec<HydraBuild> = decode(&captured("eval-builds.json")).unwrap();
        assert_eq!(builds.len(), 3);

        for (file, meaning) in [
            ("404-jobset.json", Some(Missing::Jobset)),
            ("404-latest.json", Some(Missing::SuccessfulBuild)),
            ("404-latest-for.json", Some(Missing::SuccessfulBuild)),
            ("404.json", None),
        ] {
            let error: HydraError = decode(&captured(file)).unwrap();
            assert_eq!(Missing::from_message(&error.error), meaning, "{file}");
        }
    }

    #[test]
    fn eval_verdicts_on_captured_builds() {
        let builds: Vec<HydraBuild> = decode(&captured("eval-builds.json")).unwrap();
        // Build 5 of evaluation 3 is still queued.
        assert!(
            matches!(eval_verdict(&builds, "agent", None), EvalVerdict::Skip(why) if why == "has 1 unfinished builds")
        );
        let finished: Vec<HydraBuild> = builds.into_iter().filter(|b| b.finished).collect();
        let verdict = |job, system| match eval_verdict(&finished, job, system) {
            EvalVerdict::Deploy(build) => Ok(build.id),
            EvalVerdict::Skip(why) | EvalVerdict::Failed(why) => Err(why),
        };
        assert_eq!(verdict("agent", Some("x86_64-linux")), Ok(4));
        assert_eq!(verdict("agent", Some("aarch64-linux")), Ok(3));
        assert_eq!(
            verdict("agent", Some("riscv64-linux")),
            Err("has no build of agent for riscv64-linux".into())
        );
        assert_eq!(
            verdict("nosuch", None),
            Err("has no build of nosuch".into())
        );
    }

    #[test]
    fn deploys_the_captured_build() {
        let build = deploy(&captured("build.json"), 4, "out").unwrap();
        assert_eq!(build.id, 4);
        assert_eq!(build.stoptime, Some(1_700_000_220));
        assert_eq!(build.system, "x86_64-linux");
        assert_eq!(
            build.out_path.as_str(),
            "/nix/store/ywd0s510ywbfhczmgis9ywb3y0q8xcwn-hail-test-agent-2"
        );
        let err = deploy(&captured("build.json"), 4, "bin").unwrap_err();
        assert!(
            err.contains("no output \"bin\" (its outputs: [\"out\"]"),
            "{err}"
        );
        let err = deploy(&captured("build-unfinished.json"), 5, "out").unwrap_err();
        assert!(err.contains("has not finished"), "{err}");
        let err = deploy(&captured("build-failed.json"), 2, "out").unwrap_err();
        assert!(err.contains("buildstatus 1 (failed)"), "{err}");
    }

    #[test]
    fn stoptime_missing_null_or_malformed_is_an_unknown_age() {
        for stoptime in [
            None,
            Some(Value::Null),
            Some(json!("yesterday")),
            Some(json!(-5)),
            Some(json!(1.7e9)),
            Some(json!({})),
        ] {
            let mut json = captured("build.json");
            match &stoptime {
                None => {
                    json.as_object_mut().unwrap().remove("stoptime");
                }
                Some(value) => json["stoptime"] = value.clone(),
            }
            let build = deploy(&json, 4, "out").unwrap();
            assert_eq!(build.stoptime, None, "{stoptime:?}");
        }
    }

    #[test]
    fn rejects_what_cannot_be_deployed() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("its id is 4, not 5", Box::new(|_| {})),
            (
                "invalid type: boolean `true`, expected \"finished\" as the integer 0 or 1",
                Box::new(|b| b["finished"] = true.into()),
            ),
            (
                "invalid value: integer `2`, expected \"finished\" as the integer 0 or 1",
                Box::new(|b| b["finished"] = 2.into()),
            ),
            (
                "has not finished yet",
                Box::new(|b| b["finished"] = 0.into()),
            ),
            ("buildstatus 1", Box::new(|b| b["buildstatus"] = 1.into())),
            (
                "\"buildstatus\" is null",
                Box::new(|b| b["buildstatus"] = Value::Null),
            ),
            (
                "expected \"buildstatus\" as an integer or null",
                Box::new(|b| b["buildstatus"] = "0".into()),
            ),
            (
                "missing field `buildoutputs`",
                Box::new(|b| {
                    b.as_object_mut().unwrap().remove("buildoutputs");
                }),
            ),
            (
                "content-addressed",
                Box::new(|b| b["buildoutputs"]["out"]["path"] = Value::Null),
            ),
            (
                "missing field `path`",
                Box::new(|b| b["buildoutputs"]["out"] = json!({})),
            ),
            (
                "expected an output like {\"path\": \"/nix/store/…\"}",
                Box::new(|b| b["buildoutputs"]["out"] = "/nix/store/x".into()),
            ),
            (
                "expected \"path\" as a store path",
                Box::new(|b| b["buildoutputs"]["out"]["path"] = 7.into()),
            ),
            (
                "not a valid store path",
                Box::new(|b| b["buildoutputs"]["out"]["path"] = "/nix/store/../../etc".into()),
            ),
            (
                "invalid type: string \"4\", expected \"id\" as a build number",
                Box::new(|b| b["id"] = "4".into()),
            ),
            (
                "invalid length 0, expected a Hydra build object",
                Box::new(|b| *b = json!([])),
            ),
            (
                "invalid type: string \"4\", expected a Hydra build object",
                Box::new(|b| *b = "4".into()),
            ),
        ];
        for (expected, mutate) in cases {
            let mut json = captured("build.json");
            mutate(&mut json);
            let wanted_id = if expected.contains("not 5") { 5 } else { 4 };
            let err = deploy(&json, wanted_id, "out").unwrap_err();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }
}
