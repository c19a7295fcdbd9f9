//! `docs/configuration.md` lists exactly the aggregator's flags, each with the
//! environment variable it reads: the doc is where an operator looks them up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use clap::CommandFactory;
use mcpguard_aggregator::Config;

const SECTION: &str = "## The gateway URL's aggregator (`mcpguard-aggregator`)";

/// The flag lines of the section's text block: flag → (line number, variable).
fn documented() -> BTreeMap<String, (usize, Option<String>)> {
    let path = format!("{}/../docs/configuration.md", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let mut inside = false;
    let mut block = false;
    let mut found = BTreeMap::new();
    for (i, line) in doc.lines().enumerate() {
        if line.starts_with("## ") {
            inside = line.trim_end() == SECTION;
            continue;
        }
        if !inside {
            continue;
        }
        if line.starts_with("```") {
            block = !block;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(flag) = words.first().filter(|w| block && w.starts_with("--")) else {
            continue;
        };
        let env = words
            .iter()
            .skip(1)
            .take(2)
            .find(|w| w.starts_with("MCPGUARD_"))
            .map(|w| (*w).to_owned());
        let again = found.insert((*flag).to_owned(), (i + 1, env));
        assert!(
            again.is_none(),
            "docs/configuration.md:{}: {flag} is listed twice",
            i + 1
        );
    }
    assert!(!found.is_empty(), "no flags under `{SECTION}`");
    found
}

#[test]
fn configuration_md_lists_exactly_the_aggregators_flags() {
    let flags: BTreeMap<String, Option<String>> = Config::command()
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((format!("--{}", a.get_long()?), env))
        })
        .filter(|(long, _)| long != "--help" && long != "--version")
        .collect();
    let documented = documented();
    let mut problems = Vec::new();
    for (flag, env) in &flags {
        match documented.get(flag) {
            None => problems.push(format!("{flag} ({env:?}) is not documented")),
            Some((n, said)) if said != env => {
                problems.push(format!(
                    "line {n}: {flag} reads {env:?}, the doc says {said:?}"
                ));
            }
            Some(_) => {}
        }
    }
    for (flag, (n, _)) in &documented {
        if !flags.contains_key(flag) {
            problems.push(format!(
                "line {n}: {flag} is not a flag of mcpguard-aggregator"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md and aggregator/src/lib.rs disagree:\n{}",
        problems.join("\n")
    );
}
