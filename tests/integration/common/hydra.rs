//! A Hydra stand-in on 127.0.0.1 that answers the way real Hydra does
//! (`../shared/hydra/HYDRA.md`, captured responses in `tests/data/hydra/`):
//! HTML unless `Accept: application/json` comes first, an absolute 302 from
//! `…/latest` built from the request's Host, `{"error":…}` bodies, integer
//! `finished`, keys in random order. It also serves a binary cache directory
//! at the same origin, as a Hydra with a local store does, and can be told to
//! misbehave.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// What the stand-in received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Ways to misbehave, for requests whose path ends with a given suffix.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Read the request, never answer.
    Hang,
    /// Answer with this status, content type and body.
    Respond(u16, &'static str, Vec<u8>),
    /// A Content-Length larger than the body, then close.
    Truncate(Vec<u8>),
    /// Close the connection without a word.
    Close,
    /// 302 to this Location (as a misconfigured proxy or a loop would).
    Redirect(String),
    /// Answer as usual, this much later (a busy Hydra).
    Delay(Duration),
}

#[derive(Default)]
struct Shared {
    builds: BTreeMap<u64, Value>,
    /// What `/build/ID` serves instead of the build (malformed answers);
    /// `…/latest` still decides from the real builds.
    served: BTreeMap<u64, Value>,
    jobsets: Vec<(String, String)>,
    requests: Vec<Request>,
    bytes_sent: u64,
    faults: Vec<(String, Fault)>,
    /// Origin for Location headers instead of the request's Host (a
    /// reverse proxy without the right X-Forwarded-* headers).
    location_origin: Option<String>,
    basic_auth: Option<String>,
    /// Hydra's global `private = 1`: 403 on every page without a session.
    private: bool,
    /// Hydra's `jobsetrenames`: (project, old name, new name).
    renamed_jobsets: Vec<(String, String, String)>,
    cache_dir: Option<PathBuf>,
}

pub struct Hydra {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl Hydra {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&shared), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, st) = (Arc::clone(&s), Arc::clone(&st));
                std::thread::spawn(move || serve(conn, &s, &st));
            }
        });
        Self { addr, shared, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    pub fn job_uri(&self, job: &str) -> String {
        format!("{}/job/hail/main/{job}", self.origin())
    }

    fn with<R>(&self, f: impl FnOnce(&mut Shared) -> R) -> R {
        f(&mut self.shared.lock().expect("stand-in state"))
    }

    /// Adds a build of `hail:main:job` for x86_64-linux with the next id, in
    /// an evaluation of its own: `status` 0 is a success; `None` is queued
    /// (unfinished). Returns its id.
    pub fn add_build(&self, job: &str, out_path: &str, status: Option<i64>) -> u64 {
        self.add_build_in(job, "x86_64-linux", out_path, status, None)
    }

    /// Adds a build for `system` in evaluation `eval` (a new evaluation
    /// numbered like the build if `None`). Returns its id.
    pub fn add_build_in(
        &self,
        job: &str,
        system: &str,
        out_path: &str,
        status: Option<i64>,
        eval: Option<u64>,
    ) -> u64 {
        self.with(|s| {
            if s.jobsets.is_empty() {
                s.jobsets.push(("hail".into(), "main".into()));
            }
            let id = s.builds.keys().next_back().map_or(1, |id| id + 1);
            let mut build = build_object(id, job, out_path, status);
            build["system"] = system.into();
            build["jobsetevals"] = json!([eval.unwrap_or(id)]);
            s.builds.insert(id, build);
            id
        })
    }

    /// Finishes a queued build with `status`.
    pub fn finish_build(&self, id: u64, status: i64) {
        self.with(|s| {
            if let Some(build) = s.builds.get_mut(&id) {
                build["finished"] = 1.into();
                build["buildstatus"] = status.into();
                build["stoptime"] = build["timestamp"].clone();
            }
        });
    }

    /// Sets when a build finished (Unix time).
    pub fn set_stoptime(&self, id: u64, stoptime: u64) {
        self.with(|s| {
            if let Some(build) = s.builds.get_mut(&id) {
                build["stoptime"] = stoptime.into();
            }
        });
    }

    /// Serves `build` as `/build/ID` instead of the real build object (for
    /// malformed answers); `…/latest` still points at ID.
    pub fn set_build_json(&self, id: u64, build: Value) {
        self.with(|s| s.served.insert(id, build));
    }

    pub fn fault(&self, path_suffix: &str, fault: Fault) {
        self.with(|s| s.faults.push((path_suffix.into(), fault)));
    }

    pub fn clear_faults(&self) {
        self.with(|s| s.faults.clear());
    }

    pub fn location_origin(&self, origin: &str) {
        self.with(|s| s.location_origin = Some(origin.into()));
    }

    /// Demand HTTP Basic auth on every request, like nginx `auth_basic`.
    pub fn require_basic_auth(&self, login: &str, password: &str) {
        let token = base64(format!("{login}:{password}").as_bytes());
        self.with(|s| s.basic_auth = Some(format!("Basic {token}")));
    }

    /// Hydra's global `private = 1`: every page, the cache included, answers
    /// 403 without a login session, whatever `Authorization` says.
    pub fn make_private(&self) {
        self.with(|s| s.private = true);
    }

    /// Renames jobset `hail:from` to `to`, as Hydra's jobset settings do: the
    /// old name answers 301 to the new one on every job and jobset endpoint.
    pub fn rename_jobset(&self, from: &str, to: &str) {
        self.with(|s| {
            s.renamed_jobsets
                .push(("hail".into(), from.into(), to.into()))
        });
    }

    pub fn serve_cache(&self, dir: PathBuf) {
        self.with(|s| s.cache_dir = Some(dir));
    }

    pub fn requests(&self) -> Vec<Request> {
        self.with(|s| s.requests.clone())
    }

    /// Requests to Hydra's API, not to the binary cache.
    pub fn api_requests(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| !is_cache_path(&r.path))
            .collect()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.with(|s| s.bytes_sent)
    }
}

impl Drop for Hydra {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn is_cache_path(path: &str) -> bool {
    path == "/nix-cache-info" || path.ends_with(".narinfo") || path.starts_with("/nar/")
}

/// A build object with exactly the 18 keys real Hydra sends.
pub fn build_object(id: u64, job: &str, out_path: &str, status: Option<i64>) -> Value {
    let finished = status.is_some();
    json!({
        "id": id,
        "finished": i64::from(finished),
        "buildstatus": status,
        "timestamp": 1_700_000_000 + id * 100,
        "starttime": finished.then_some(1_700_000_010 + id * 100),
        "stoptime": finished.then_some(1_700_000_020 + id * 100),
        "project": "hail",
        "jobset": "main",
        "job": job,
        "system": "x86_64-linux",
        "drvpath": format!("/nix/store/mcdaypsws1ysi0fcgcfba1gsbvy6p2zi-{job}-{id}.drv"),
        "nixname": format!("{job}-{id}"),
        "releasename": null,
        "priority": 100,
        "jobsetevals": [id],
        "buildoutputs": { "out": { "path": out_path } },
        "buildproducts": {},
        "buildmetrics": {},
    })
}

fn serve(conn: TcpStream, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let _ = conn.set_nodelay(true);
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let Some(request) = read_request(&mut reader) else {
            return;
        };
        let (fault, response) = {
            let mut s = shared.lock().expect("stand-in state");
            s.requests.push(request.clone());
            let fault = s
                .faults
                .iter()
                .find(|(suffix, _)| request.path.ends_with(suffix.as_str()))
                .map(|(_, f)| f.clone());
            let response = match fault {
                None | Some(Fault::Delay(_)) => Some(answer(&s, &request)),
                Some(_) => None,
            };
            (fault, response)
        };
        let bytes = match (fault, response) {
            (Some(Fault::Hang), _) => {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            (Some(Fault::Close), _) => return,
            (Some(Fault::Truncate(body)), _) => {
                let mut head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len() + 1000
                )
                .into_bytes();
                head.extend_from_slice(&body);
                let _ = writer.write_all(&head);
                return;
            }
            (Some(Fault::Respond(status, ctype, body)), _) => {
                encode(status, &[("Content-Type", ctype)], &body)
            }
            (Some(Fault::Redirect(location)), _) => redirect(302, &location),
            (Some(Fault::Delay(delay)), Some(bytes)) => {
                std::thread::sleep(delay);
                bytes
            }
            (None, Some(bytes)) => bytes,
            (None | Some(Fault::Delay(_)), None) => return,
        };
        // Catalyst under Plack answers HEAD as GET without the body
        // (Plack::Middleware::Head): headers, Content-Length included.
        let bytes = match request.method.as_str() {
            "HEAD" => match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(end) => bytes[..end + 4].to_vec(),
                None => bytes,
            },
            _ => bytes,
        };
        shared.lock().expect("stand-in state").bytes_sent += bytes.len() as u64;
        if writer.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

/// Real Hydra's content negotiation: JSON only when the first media type
/// the client accepts is application/json.
fn wants_json(request: &Request) -> bool {
    request
        .header("Accept")
        .and_then(|accept| accept.split(',').next())
        .map(|first| first.split(';').next().unwrap_or("").trim())
        == Some("application/json")
}

fn answer(s: &Shared, request: &Request) -> Vec<u8> {
    if let Some(expected) = &s.basic_auth
        && request.header("Authorization") != Some(expected.as_str())
    {
        return encode(
                401,
                &[
                    ("Content-Type", "text/html"),
                    ("WWW-Authenticate", "Basic realm=\"hydra\""),
                ],
            b"<html><head><title>401 Authorization Required</title></head><body><center><h1>401 Authorization Required</h1></center><hr><center>nginx</center></body></html>\n",
        );
    }
    let json = wants_json(request);
    if s.private {
        return error(json, 403, "This page requires you to sign in.");
    }
    let (path, query) = request
        .path
        .split_once('?')
        .unwrap_or((request.path.as_str(), ""));
    if is_cache_path(path) {
        return cache_file(s, path);
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Hydra's job and jobset chains look the jobset up first: 404 if
    // unknown, 301 to the new name if renamed, for every endpoint below them.
    if let ["job" | "jobset", project, jobset, ..] = segments[..]
        && !s.jobsets.iter().any(|(p, j)| p == project && j == jobset)
    {
        let renamed = s
            .renamed_jobsets
            .iter()
            .find(|(p, from, _)| p == project && from == jobset);
        return match renamed {
            Some((_, _, to)) => {
                let mut moved = segments.clone();
                moved[2] = to;
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{query}")
                };
                redirect(
                    301,
                    &format!("{}/{}{query}", location_origin(s, request), moved.join("/")),
                )
            }
            // The jobset chain checks the project first; the job chain does not.
            None if segments[0] == "jobset" && !s.jobsets.iter().any(|(p, _)| p == project) => {
                error(
                    json,
                    404,
                    &format!("Project \u{2018}{project}\u{2019} doesn't exist."),
                )
            }
            None => error(
                json,
                404,
                &format!("Jobset \u{2018}{jobset}\u{2019} doesn't exist."),
            ),
        };
    }
    match segments[..] {
        ["job", _, _, job, "latest"]
        | ["job", _, _, job, "latest-for", _]
        | ["job", _, _, job, "latest-finished"] => {
            let system = match segments[4..] {
                ["latest-for", system] => Some(system),
                _ => None,
            };
            let finished_only = segments[4] == "latest-finished";
            // The highest id of a successful build of the job, as Hydra's SQL has it.
            let latest = s.builds.iter().rev().find(|(_, b)| {
                b["job"] == job
                    && b["finished"] == 1
                    && b["buildstatus"] == 0
                    && system.is_none_or(|sys| b["system"] == sys)
                    && (!finished_only || in_complete_eval(s, b))
            });
            match (latest, system) {
                (Some((id, _)), _) => {
                    redirect(302, &format!("{}/build/{id}", location_origin(s, request)))
                }
                (None, Some(system)) => error(
                    json,
                    404,
                    &format!(
                        "There is no successful build for platform `{system}' to redirect to."
                    ),
                ),
                (None, None) => error(json, 404, "There is no successful build to redirect to."),
            }
        }
        // Hydra's latest-eval: the newest evaluation with no unfinished builds
        // (failed ones are fine), redirected to whatever the Accept.
        ["jobset", _, jobset, "latest-eval"] => {
            let complete = eval_ids(s)
                .into_iter()
                .find(|eval| eval_builds(s, *eval).all(|b| b["finished"] == 1));
            match complete {
                Some(eval) => redirect(
                    302,
                    &format!("{}/eval/{eval}?name={jobset}", location_origin(s, request)),
                ),
                None => error(json, 404, "No evaluation found."),
            }
        }
        ["jobset", _, _, "evals"] if json => {
            let page: usize = request
                .path
                .split_once("?page=")
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(1)
                .max(1);
            let ids = eval_ids(s);
            let pages = ids.len().div_ceil(20).max(1);
            let evals: Vec<Value> = ids
                .iter()
                .skip((page - 1) * 20)
                .take(20)
                .map(|id| eval_object(s, *id))
                .collect();
            let mut listing = json!({
                "evals": evals,
                "first": "?page=1",
                "last": format!("?page={pages}"),
            });
            if page < pages {
                listing["next"] = format!("?page={}", page + 1).into();
            }
            if page > 1 {
                listing["previous"] = format!("?page={}", page - 1).into();
            }
            encode(
                200,
                &[("Content-Type", "application/json")],
                shuffled(&listing).as_bytes(),
            )
        }
        // The job's build in the evaluation (Hydra takes the first its query
        // finds; here, the highest id), whatever its status.
        ["eval", id, "job", job] => match id.parse::<u64>() {
            Ok(id) if eval_ids(s).contains(&id) => {
                match eval_builds(s, id).filter(|b| b["job"] == job).last() {
                    Some(build) => redirect(
                        302,
                        &format!("{}/build/{}", location_origin(s, request), build["id"]),
                    ),
                    None => error(
                        json,
                        404,
                        "This evaluation has no job with the specified name.",
                    ),
                }
            }
            _ => error(json, 404, &format!("Evaluation {id} doesn't exist.")),
        },
        ["eval", id, "builds"] if json => match id.parse::<u64>() {
            Ok(id) if eval_ids(s).contains(&id) => {
                let builds: Vec<String> = eval_builds(s, id).map(shuffled).collect();
                let body = format!("[{}]", builds.join(","));
                encode(
                    200,
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
            }
            _ => error(json, 404, &format!("Evaluation {id} doesn't exist.")),
        },
        ["build", id] => match id.parse::<u64>() {
            Ok(id) => match s.served.get(&id).or_else(|| s.builds.get(&id)) {
                Some(build) if json => encode(
                    200,
                    &[("Content-Type", "application/json")],
                    shuffled(build).as_bytes(),
                ),
                Some(_) => html(200, "Build"),
                None => error(json, 404, &format!("Build with ID {id} doesn't exist.")),
            },
            Err(_) => error(
                json,
                500,
                "Caught exception in Hydra::Controller::Build->buildChain",
            ),
        },
        _ => error(json, 404, "Page not found."),
    }
}

/// Evaluation ids, newest first.
fn eval_ids(s: &Shared) -> Vec<u64> {
    let mut ids: Vec<u64> = s
        .builds
        .values()
        .flat_map(|b| b["jobsetevals"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_u64())
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.dedup();
    ids
}

fn eval_builds(s: &Shared, eval: u64) -> impl Iterator<Item = &Value> {
    s.builds.values().filter(move |b| {
        b["jobsetevals"]
            .as_array()
            .is_some_and(|es| es.contains(&eval.into()))
    })
}

/// Whether `build` belongs to an evaluation with no unfinished builds.
fn in_complete_eval(s: &Shared, build: &Value) -> bool {
    build["jobsetevals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .any(|eval| eval_builds(s, eval).all(|b| b["finished"] == 1))
}

fn eval_object(s: &Shared, id: u64) -> Value {
    let builds: Vec<u64> = eval_builds(s, id)
        .filter_map(|b| b["id"].as_u64())
        .collect();
    json!({
        "id": id,
        "timestamp": 1_700_000_000 + id * 100,
        "checkouttime": 1,
        "evaltime": 2,
        "hasnewbuilds": 1,
        "flake": null,
        "builds": builds,
        "jobsetevalinputs": {
            "src": { "type": "git", "uri": "https://example.org/hail.git", "revision": format!("{id:040}"), "value": null, "dependency": null }
        },
    })
}

fn cache_file(s: &Shared, path: &str) -> Vec<u8> {
    let file = s
        .cache_dir
        .as_ref()
        .map(|dir| dir.join(path.trim_start_matches('/')));
    match file.map(std::fs::read) {
        Some(Ok(body)) => {
            let ctype = if path.ends_with(".narinfo") {
                "text/x-nix-narinfo"
            } else {
                "application/octet-stream"
            };
            encode(200, &[("Content-Type", ctype)], &body)
        }
        _ => encode(404, &[("Content-Type", "text/plain")], b"404 Not Found\n"),
    }
}

/// Where Hydra's redirects point: built from the request's Host, unless a
/// misconfigured proxy is simulated.
fn location_origin(s: &Shared, request: &Request) -> String {
    s.location_origin
        .clone()
        .unwrap_or_else(|| format!("http://{}", request.header("Host").unwrap_or("localhost")))
}

/// Catalyst's redirect: its "Moved" page whatever the Accept.
fn redirect(status: u16, location: &str) -> Vec<u8> {
    let body = format!(
        "<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Strict//EN\" \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd\">\n    <html xmlns=\"http://www.w3.org/1999/xhtml\">\n    <head>\n    <title>Moved</title>\n    </head>\n    <body>\n   <p>This item has moved <a href=\"{location}\">here</a>.</p>\n</body>\n</html>\n"
    );
    encode(
        status,
        &[
            ("Location", location),
            ("Content-Type", "text/html; charset=utf-8"),
        ],
        body.as_bytes(),
    )
}

fn error(json: bool, status: u16, message: &str) -> Vec<u8> {
    if json {
        let body = json!({ "error": message }).to_string();
        encode(
            status,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    } else {
        html(status, message)
    }
}

fn html(status: u16, title: &str) -> Vec<u8> {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
    );
    encode(
        status,
        &[("Content-Type", "text/html; charset=utf-8")],
        body.as_bytes(),
    )
}

/// Serialises an object with its keys in random order, as Hydra does.
fn shuffled(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // A cheap shuffle; the point is only "not sorted, not stable".
            let mut seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.subsec_nanos() as usize | 1);
            for i in (1..entries.len()).rev() {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                entries.swap(i, (seed >> 33) % (i + 1));
            }
            let fields: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), shuffled(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        other => other.to_string(),
    }
}

fn encode(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Vary: Accept\r\nSet-Cookie: hydra_session=7bef16bc5eec5bfe867b15519e8b078f01570907; path=/; HttpOnly; SameSite=Lax\r\n");
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: keep-alive\r\n\r\n",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A listener that records whether anyone connected, and answers nothing.
pub struct Bystander {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<String>>>,
}

impl Bystander {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the bystander");
        let addr = listener.local_addr().expect("bystander address");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&connections);
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = vec![0; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                seen.lock()
                    .expect("bystander")
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Self { addr, connections }
    }

    pub fn connections(&self) -> Vec<String> {
        self.connections.lock().expect("bystander").clone()
    }
}
