//! The documentation stays true to the code. What can be generated is: the man page
//! `docs/hail.1` and the shell completions in `docs/completions/` from the clap definition
//! (`hail::cli::Cli`), and `docs/nixos-options.md` from `nixos/module.nix` itself. Each test
//! renders its file and fails when the committed one differs; `HAIL_BLESS=1 cargo test
//! --locked docs::` writes them instead. The hand-written pages are checked where the code
//! can say what they must contain: every option and subcommand in `docs/command-line.md`,
//! every module of `src/` once in the README's "Architecture", and every relative link
//! between the pages.
//!
//! The NixOS option reference needs nixpkgs' lib, found as the `nixos::` tests find it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use serde_json::Value;

use crate::units::{NIX_HINT, nix_instantiate, nixpkgs_lib, output_text, repo, run};

/// The one command that rewrites every generated file.
const BLESS: &str = "HAIL_BLESS=1 cargo test --locked docs::";

/// Whether this run rewrites the generated files instead of comparing them.
fn blessing() -> bool {
    let bless = std::env::var_os("HAIL_BLESS").is_some_and(|v| v == "1");
    assert!(
        !(bless && std::env::var_os("CI").is_some()),
        "HAIL_BLESS=1 in CI would rewrite the generated docs instead of checking them"
    );
    bless
}

/// Why `committed` (the file as it is, `None` if missing) is not `generated`, or `None`
/// when it is current.
fn staleness(relative: &str, committed: Option<&str>, generated: &str) -> Option<String> {
    let Some(committed) = committed else {
        return Some(format!(
            "{relative} is missing; generate it with `{BLESS}` and commit it"
        ));
    };
    if committed == generated {
        return None;
    }
    let (line, (old, new)) = committed
        .lines()
        .chain(std::iter::repeat(""))
        .zip(generated.lines().chain(std::iter::repeat("")))
        .enumerate()
        .find(|(_, (old, new))| old != new)
        .unwrap_or((0, ("", "")));
    Some(format!(
        "{relative} is stale: line {} is {old:?}, the code now gives {new:?}. \
         Regenerate it with `{BLESS}` and commit it; do not edit it by hand",
        line + 1
    ))
}

/// Compares the generated text with the committed file, or writes it when blessing.
fn check_generated(relative: &str, generated: &str) {
    let path = repo().join(relative);
    if blessing() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        }
        std::fs::write(&path, generated)
            .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        eprintln!("docs: wrote {relative}");
        return;
    }
    let committed = std::fs::read_to_string(&path).ok();
    if let Some(message) = staleness(relative, committed.as_deref(), generated) {
        panic!("{message}");
    }
}

#[test]
fn a_stale_file_is_reported_with_the_command_that_regenerates_it() {
    assert_eq!(staleness("docs/x", Some("a\nb\n"), "a\nb\n"), None);
    let stale = staleness("docs/x", Some("a\nb\n"), "a\nc\n").expect("stale");
    assert!(
        stale.contains("docs/x is stale: line 2 is \"b\", the code now gives \"c\"")
            && stale.contains(BLESS),
        "{stale}"
    );
    let longer = staleness("docs/x", Some("a\n"), "a\nb\n").expect("stale");
    assert!(longer.contains("line 2 is \"\""), "{longer}");
    let missing = staleness("docs/x", None, "a\n").expect("missing");
    assert!(
        missing.contains("docs/x is missing") && missing.contains(BLESS),
        "{missing}"
    );
}

/// hail's command and its visible subcommands (`hail service activate`, …; no `help`),
/// built, each with its words.
fn visible_commands() -> Vec<(String, clap::Command)> {
    fn without_help(command: clap::Command) -> clap::Command {
        let names: Vec<String> = command
            .get_subcommands()
            .map(|sub| sub.get_name().to_owned())
            .collect();
        names
            .iter()
            .fold(command.disable_help_subcommand(true), |command, name| {
                command.mut_subcommand(name, without_help)
            })
    }
    let mut root = without_help(hail::cli::Cli::command());
    root.build();
    let mut commands = Vec::new();
    let mut pending = vec![(String::from("hail"), root)];
    while let Some((words, command)) = pending.pop() {
        for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            pending.push((format!("{words} {}", sub.get_name()), sub.clone()));
        }
        commands.push((words, command));
    }
    commands.sort_by(|a, b| a.0.cmp(&b.0));
    commands
}

#[test]
fn man_pages_are_generated_from_the_command_line() {
    let mut written = Vec::new();
    for (_, command) in visible_commands() {
        let man =
            clap_mangen::Man::new(command).source(concat!("hail ", env!("CARGO_PKG_VERSION")));
        let mut page = Vec::new();
        man.render(&mut page).expect("render a man page");
        let name = format!("docs/{}", man.get_filename());
        check_generated(
            &name,
            &String::from_utf8(page).expect("a man page is UTF-8"),
        );
        written.push(name);
    }
    assert!(written.contains(&"docs/hail.1".to_owned()), "{written:?}");
    // A page for a subcommand that is gone is stale too.
    for entry in std::fs::read_dir(repo().join("docs")).expect("read docs/") {
        let path = entry.expect("directory entry").path();
        let name = format!(
            "docs/{}",
            path.file_name().expect("a name").to_string_lossy()
        );
        if name.ends_with(".1") && !written.contains(&name) {
            if blessing() {
                std::fs::remove_file(&path).expect("remove a stale man page");
            } else {
                panic!("{name} is no longer generated (no such command); remove it with `{BLESS}`");
            }
        }
    }
}

#[test]
fn shell_completions_are_generated_from_the_command_line() {
    for (shell, file) in [
        (Shell::Bash, "hail.bash"),
        (Shell::Zsh, "_hail"),
        (Shell::Fish, "hail.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut hail::cli::Cli::command(), "hail", &mut script);
        check_generated(
            &format!("docs/completions/{file}"),
            &String::from_utf8(script).expect("the completion script is UTF-8"),
        );
    }
}

/// The visible options of `nixos/module.nix`, as nixpkgs' own option documentation
/// sees them (`lib.optionAttrSetToDocList`). Options the module sets elsewhere
/// (systemd.services, …) are not declared here, hence `_module.check = false`.
const MODULE_OPTIONS: &str = r#"
{ lib, modulePath }:
let
  evaluated = lib.evalModules {
    modules = [
      (/. + modulePath)
      { _module.check = false; }
    ];
  };
in
map (option: {
  inherit (option) name description type;
  default = option.default or null;
  example = option.example or null;
}) (builtins.filter (option: option.visible != false && !option.internal)
  (lib.optionAttrSetToDocList evaluated.options.services.hail))
"#;

#[test]
fn nixos_option_reference_is_generated_from_the_module() {
    let Some(lib) = nixpkgs_lib("docs::nixos_option_reference_is_generated_from_the_module") else {
        return;
    };
    let output = run(
        nix_instantiate()
            .args(["--eval", "--strict", "--json", "--expr", MODULE_OPTIONS])
            .args(["--arg", "lib", &lib, "--argstr", "modulePath"])
            .arg(repo().join("nixos/module.nix")),
        NIX_HINT,
    );
    assert!(
        output.status.success(),
        "evaluating the options of nixos/module.nix failed:\n{}",
        output_text(&output)
    );
    let options: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("not a JSON list ({err}):\n{}", output_text(&output)));
    assert!(
        options
            .iter()
            .any(|o| o["name"] == "services.hail.instances.<name>.jobUri"),
        "no jobUri among the module's options: {options:?}"
    );
    check_generated("docs/nixos-options.md", &option_reference(&options));
}

/// Markdown for the module's options, in nixpkgs' order (by name).
fn option_reference(options: &[Value]) -> String {
    let mut text = format!(
        "# NixOS options\n\n\
         <!-- Generated from nixos/module.nix by `{BLESS}`; do not edit. -->\n\n\
         The options of hail's NixOS module, `nixos/module.nix`. How to use the module: \
         [nixos.md](nixos.md).\n"
    );
    for option in options {
        let field = |key: &str| {
            option[key]
                .as_str()
                .unwrap_or_else(|| panic!("option without a string {key}: {option}"))
        };
        text.push_str(&format!(
            "\n## `{}`\n\n{}\n\n*Type:* {}\n",
            field("name"),
            plain_markdown(field("description").trim_end()),
            field("type")
        ));
        for (label, key) in [("Default", "default"), ("Example", "example")] {
            if let Some(value) = option_value(&option[key]) {
                text.push_str(&format!("\n*{label}:*{value}\n"));
            }
        }
    }
    text
}

/// A default or example as nixpkgs renders it: a Nix expression, or Markdown.
fn option_value(value: &Value) -> Option<String> {
    let (kind, text) = match value {
        Value::Null => return None,
        Value::Object(rendered) => (
            rendered.get("_type").and_then(Value::as_str).unwrap_or(""),
            rendered.get("text").and_then(Value::as_str).unwrap_or(""),
        ),
        other => panic!("an option value nixpkgs did not render: {other}"),
    };
    let text = text.trim_end();
    Some(match kind {
        "literalMD" => format!(" {}", plain_markdown(text)),
        "literalExpression" if text.contains(['\n', '`']) => format!("\n\n```nix\n{text}\n```"),
        "literalExpression" => format!(" `{text}`"),
        other => panic!("an option value of unknown type {other:?}: {value}"),
    })
}

/// NixOS's Markdown without its roles: {option}`x` and {manpage}`x(7)` become `x`.
fn plain_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let role = rest[start + 1..].find('}').and_then(|end| {
            let name = &rest[start + 1..start + 1 + end];
            let after = &rest[start + 2 + end..];
            (!name.is_empty()
                && name.bytes().all(|b| b.is_ascii_lowercase())
                && after.starts_with('`'))
            .then_some(start + 2 + end)
        });
        match role {
            Some(after) => {
                out.push_str(&rest[..start]);
                rest = &rest[after..];
            }
            None => {
                out.push_str(&rest[..=start]);
                rest = &rest[start + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn markdown_roles_are_dropped_and_braces_kept() {
    assert_eq!(
        plain_markdown("every {option}`pollPeriod`, see {manpage}`systemd.time(7)`"),
        "every `pollPeriod`, see `systemd.time(7)`"
    );
    assert_eq!(
        plain_markdown("{ web.jobUri = …; } and {x} `y`"),
        "{ web.jobUri = …; } and {x} `y`"
    );
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|err| panic!("read {relative}: {err}"))
}

/// Whether `text` names the option `--long`, not merely one that starts with it.
fn mentions_option(text: &str, long: &str) -> bool {
    let flag = format!("--{long}");
    text.match_indices(&flag).any(|(at, _)| {
        !text[at + flag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[test]
fn command_line_reference_names_every_option_and_subcommand() {
    let reference = read("docs/command-line.md");
    let mut missing = Vec::new();
    for (words, command) in visible_commands() {
        if words != "hail" && !reference.contains(&format!("`{words}")) {
            missing.push(format!("the subcommand `{words}`"));
        }
        for arg in command.get_arguments().filter(|arg| !arg.is_hide_set()) {
            if let Some(long) = arg.get_long()
                && !mentions_option(&reference, long)
            {
                missing.push(format!("`--{long}` of `{words}`"));
            }
            if let Some(env) = arg.get_env().and_then(|env| env.to_str())
                && !arg.is_hide_env_set()
                && !reference.contains(env)
            {
                missing.push(format!("`{env}` of `{words}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/command-line.md does not mention {}",
        missing.join(", ")
    );
}

#[test]
fn option_mentions_are_whole_names() {
    assert!(mentions_option("`--system SYSTEM`", "system"));
    assert!(mentions_option("ends with --force", "force"));
    assert!(!mentions_option("`--systems`", "system"));
    assert!(!mentions_option("`--nix-timeout`", "nix"));
}

/// The README's "## Architecture" section, up to the next second-level heading.
fn architecture_section(readme: &str) -> &str {
    let start = readme
        .find("\n## Architecture\n")
        .expect("README.md has a \"## Architecture\" section");
    let body = &readme[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |end| end + 3);
    &body[..end]
}

#[test]
fn readme_architecture_names_every_module_once() {
    let readme = read("README.md");
    let section = architecture_section(&readme);
    let mut named: BTreeMap<String, usize> = BTreeMap::new();
    for (at, _) in section.match_indices("`src/") {
        let rest = &section[at + 1..];
        let end = rest.find('`').expect("a closed code span");
        if rest[..end].ends_with(".rs") {
            *named.entry(rest[..end].to_owned()).or_default() += 1;
        }
    }
    let mut modules: Vec<String> = std::fs::read_dir(repo().join("src"))
        .expect("read src/")
        .map(|entry| {
            format!(
                "src/{}",
                entry
                    .expect("directory entry")
                    .file_name()
                    .to_string_lossy()
            )
        })
        .filter(|name| name.ends_with(".rs"))
        .collect();
    modules.sort();
    for module in &modules {
        assert_eq!(
            named.get(module),
            Some(&1),
            "README.md's Architecture names `{module}` {} times; name every module of src/ \
             exactly once, with what it owns",
            named.get(module).unwrap_or(&0)
        );
    }
    let unknown: Vec<&String> = named
        .keys()
        .filter(|name| !modules.contains(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "README.md's Architecture names files that are not in src/: {unknown:?}"
    );
}

/// The Markdown pages whose links are checked.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of a Markdown page outside fenced code blocks.
fn prose_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The anchors GitHub gives a page's headings: lower case, spaces to `-`, other
/// punctuation dropped, `-1`, `-2`, … for repeats.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = Vec::new();
    for line in prose_lines(text) {
        let hashes = line.bytes().take_while(|&b| b == b'#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug: String = line[hashes..]
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(slug.clone()).or_default();
        anchors.push(match *count {
            0 => slug,
            n => format!("{slug}-{n}"),
        });
        *count += 1;
    }
    anchors
}

/// The targets of a page's inline links `[text](target)`, outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose_lines(text) {
        // Code spans may hold `](`, as in Nix or shell text.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(index, _)| index % 2 == 0)
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join(" ");
        for (at, _) in prose.match_indices("](") {
            let rest = &prose[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push(rest[..end].to_owned());
            }
        }
    }
    targets
}

#[test]
fn links_between_the_pages_resolve() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read page");
        let name = page.strip_prefix(repo()).expect("in the repo").display();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if file.is_empty() {
                page.clone()
            } else {
                page.parent().expect("a directory").join(file)
            };
            if !linked.exists() {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && !has_anchor(&linked, anchor) {
                broken.push(format!("{name}: {target}: no such heading"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

fn has_anchor(page: &Path, anchor: &str) -> bool {
    std::fs::read_to_string(page).is_ok_and(|text| anchors(&text).iter().any(|a| a == anchor))
}

#[test]
fn anchors_and_links_are_found_as_github_makes_them() {
    let page = "# hail\n## What `activate` sees\n```\n# not a heading [x](nowhere)\n```\n\
                ## 1. A failed activation rolls back\n## Tests\n## Tests\n\
                See [status](operations.md#hail-status) and `[x](y)`.\n";
    assert_eq!(
        anchors(page),
        [
            "hail",
            "what-activate-sees",
            "1-a-failed-activation-rolls-back",
            "tests",
            "tests-1"
        ]
    );
    assert_eq!(link_targets(page), ["operations.md#hail-status"]);
}
