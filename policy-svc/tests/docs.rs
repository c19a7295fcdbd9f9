//! The reference docs say what the code does: `docs/api.md`'s admin API tables list
//! exactly the endpoint table's routes, each with its capability; its data-plane table
//! names every refusal code; `docs/configuration.md` lists exactly the service's flags,
//! each with its environment variable. A route, flag or code added without its doc row
//! fails here, with the row to add.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use clap::CommandFactory;
use mcpguard_core::check::DenyCode;
use mcpguard_policy::Config;
use mcpguard_policy::routes::{Verb, admin_api};

/// How a row names an endpoint open to every admin token (no capability).
const ANY_ADMIN: &str = "any admin";

fn read_doc(name: &str) -> String {
    let path = format!("{}/../docs/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The lines of the level-2 section titled `title`, with their 1-based line numbers.
fn section<'a>(doc: &'a str, title: &str) -> Vec<(usize, &'a str)> {
    let heading = format!("## {title}");
    let mut inside = false;
    let mut lines = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        if line.starts_with("## ") {
            inside = line.trim_end() == heading;
        } else if inside {
            lines.push((i + 1, line));
        }
    }
    assert!(!lines.is_empty(), "no section `{heading}`");
    lines
}

/// The cells of a Markdown table row (`\|` inside a cell is not a separator).
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(
        inner
            .replace("\\|", "\u{0}")
            .split('|')
            .map(|c| c.replace('\u{0}', "|").trim().to_owned())
            .collect(),
    )
}

/// The text of a cell's first code span: `` `POST /api/v1/x` `{…}` `` gives `POST /api/v1/x`.
fn first_code(cell: &str) -> Option<&str> {
    let rest = cell.strip_prefix('`')?;
    rest.split_once('`').map(|(code, _)| code)
}

fn verb(v: Verb) -> &'static str {
    match v {
        Verb::Get => "GET",
        Verb::Post => "POST",
        Verb::Put => "PUT",
        Verb::Delete => "DELETE",
    }
}

/// A capability as its cell in the table says it.
fn cell(capability: &str) -> String {
    if capability == ANY_ADMIN {
        capability.to_owned()
    } else {
        format!("`{capability}`")
    }
}

fn row(method: &str, path: &str, capability: &str) -> String {
    format!(
        "| `{method} {path}` | {} | <what it does> |",
        cell(capability)
    )
}

#[test]
fn api_md_lists_exactly_the_endpoint_table() {
    let table: BTreeMap<(String, String), String> = admin_api()
        .iter()
        .map(|e| {
            let capability = e.capability.map_or(ANY_ADMIN, |c| c.as_str());
            (
                (verb(e.method).to_owned(), e.path.to_owned()),
                capability.to_owned(),
            )
        })
        .collect();

    let doc = read_doc("api.md");
    let mut problems = Vec::new();
    let mut documented: BTreeMap<(String, String), (usize, String)> = BTreeMap::new();
    for (n, line) in section(&doc, "Admin API") {
        let Some(cells) = cells(line) else { continue };
        let Some((method, path)) = cells
            .first()
            .and_then(|c| first_code(c))
            .and_then(|c| c.split_once(' '))
            .filter(|(m, p)| {
                ["GET", "POST", "PUT", "DELETE"].contains(m) && p.starts_with("/api/")
            })
        else {
            continue;
        };
        let capability = match cells.get(1).map(String::as_str) {
            Some(ANY_ADMIN) => ANY_ADMIN,
            Some(c) => match first_code(c) {
                Some(code) => code,
                None => {
                    problems.push(format!(
                        "docs/api.md:{n}: the capability cell of `{method} {path}` must be \
                         `capability.name` or `{ANY_ADMIN}`, got {c:?}"
                    ));
                    continue;
                }
            },
            None => {
                problems.push(format!(
                    "docs/api.md:{n}: `{method} {path}` has no capability cell"
                ));
                continue;
            }
        };
        let key = (method.to_owned(), path.to_owned());
        if let Some((first, _)) = documented.get(&key) {
            problems.push(format!(
                "docs/api.md:{n}: `{method} {path}` is listed again (first on line {first}); \
                 keep one row per route"
            ));
            continue;
        }
        documented.insert(key, (n, capability.to_owned()));
    }

    for ((method, path), capability) in &table {
        match documented.get(&(method.clone(), path.clone())) {
            None => problems.push(format!(
                "docs/api.md lacks `{method} {path}`: add this row under `## Admin API`:\n    {}",
                row(method, path, capability)
            )),
            Some((n, said)) if said != capability => problems.push(format!(
                "docs/api.md:{n}: `{method} {path}` needs {} in the endpoint table, the row \
                 says {}: make its capability cell {}",
                display(capability),
                display(said),
                cell(capability)
            )),
            Some(_) => {}
        }
    }
    for ((method, path), (n, _)) in &documented {
        if !table.contains_key(&(method.clone(), path.clone())) {
            problems.push(format!(
                "docs/api.md:{n}: `{method} {path}` is not in the endpoint table \
                 (policy-svc/src/routes/mod.rs, `admin_api`): remove the row or fix its \
                 method and path"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/api.md and the endpoint table disagree ({} problems):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn display(capability: &str) -> String {
    if capability == ANY_ADMIN {
        format!("`{ANY_ADMIN}` (no capability)")
    } else {
        format!("`{capability}`")
    }
}

#[test]
fn api_md_names_every_refusal_code_with_its_status() {
    let doc = read_doc("api.md");
    let rows: Vec<Vec<String>> = section(&doc, "Data plane")
        .into_iter()
        .filter_map(|(_, line)| cells(line))
        .collect();
    let mut missing = Vec::new();
    for code in DenyCode::ALL {
        let name = format!("`{}`", code.as_str());
        let status = code.status().to_string();
        let found = rows.iter().any(|r| {
            r.len() >= 3
                && r[2].contains(&name)
                && r[1]
                    .split(|c: char| !c.is_ascii_digit())
                    .any(|w| w == status)
        });
        if !found {
            missing.push(format!(
                "{} (status {status}): a row of the table under `## Data plane` with {status} \
                 in its status cell and {name} in its code cell",
                code.as_str()
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/api.md does not name these refusal codes:\n{}",
        missing.join("\n")
    );
}

#[test]
fn configuration_md_lists_exactly_the_flags() {
    let command = Config::command();
    let flags: BTreeMap<String, Option<String>> = command
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((format!("--{long}"), env))
        })
        .filter(|(long, _)| long != "--help" && long != "--version")
        .collect();

    let doc = read_doc("configuration.md");
    let mut documented: BTreeMap<String, (usize, Option<String>)> = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        let Some(cells) = cells(line) else { continue };
        let Some(flag) = cells
            .first()
            .and_then(|c| first_code(c))
            .filter(|c| c.starts_with("--"))
        else {
            continue;
        };
        let env = cells.get(1).and_then(|c| first_code(c)).map(str::to_owned);
        if documented.insert(flag.to_owned(), (i + 1, env)).is_some() {
            problems.push(format!(
                "docs/configuration.md:{}: `{flag}` is listed twice",
                i + 1
            ));
        }
    }
    for (flag, env) in &flags {
        let env_cell = env.as_deref().map_or("none".into(), |e| format!("`{e}`"));
        match documented.get(flag) {
            None => problems.push(format!(
                "docs/configuration.md lacks `{flag}`: add the row\n    | `{flag}` | {env_cell} | <default and meaning> |"
            )),
            Some((n, said)) if said != env => problems.push(format!(
                "docs/configuration.md:{n}: `{flag}` reads {env_cell}, the row says {}",
                said.as_deref().map_or("none".into(), |e| format!("`{e}`"))
            )),
            Some(_) => {}
        }
    }
    for (flag, (n, _)) in &documented {
        if !flags.contains_key(flag) {
            problems.push(format!(
                "docs/configuration.md:{n}: `{flag}` is not a flag of mcpguard-policy \
                 (policy-svc/src/config.rs)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md and policy-svc/src/config.rs disagree:\n{}",
        problems.join("\n")
    );
}
