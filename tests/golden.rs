//! Golden scenarios (Proxmox ha-manager's `src/test/` in Rust): every
//! directory under `tests/scenarios/` is one test: loaded, run on the
//! simulator with the invariant checker on, and its event log compared with
//! `log.expect`. The harness is libtest-mimic, so each scenario passes or
//! fails by name and the usual filter picks some (`cargo test --test golden
//! power-`).
//!
//! - `HAVIRT_BLESS=1 cargo test --test golden [NAME]` writes `log.expect`
//!   instead of comparing (only for runs without invariant violations).
//!   Review the diff of every blessed file before committing it.
//!
//! On a mismatch the actual log is also written to
//! `$CARGO_TARGET_TMPDIR/golden/<name>.log` for a closer look.

use havirt::sim::scenario;
use libtest_mimic::{Arguments, Failed, Trial};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The suite must cover at least this many cases; fewer means scenarios
/// were lost (deleted or renamed away), not that the engine got simpler.
const SCENARIOS_MIN: usize = 40;

/// Lines of unchanged context around each change in a diff.
const DIFF_CONTEXT_LINES: usize = 3;

/// The longest differing middle part the LCS diff handles (per side);
/// beyond it the diff shows the first difference only, to bound memory.
const DIFF_LINES_MAX: usize = 4000;

fn main() {
    let args = Arguments::from_args();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let dirs = scenario_dirs(&root);
    let bless = std::env::var("HAVIRT_BLESS").is_ok_and(|v| v == "1");
    let count = dirs.len();
    let mut trials = vec![
        Trial::test("scenario_count", move || {
            if count >= SCENARIOS_MIN {
                Ok(())
            } else {
                Err(format!("{} has {count} scenario directories, expected at least {SCENARIOS_MIN}", root.display())
                    .into())
            }
        }),
        Trial::test(
            "diff_shows_changes_with_context_and_line_numbers",
            diff_shows_changes_with_context_and_line_numbers,
        ),
    ];
    trials.extend(
        dirs.into_iter().map(|dir| Trial::test(dir_name(&dir), move || check(&dir, bless).map_err(Failed::from))),
    );
    libtest_mimic::run(&args, trials).exit();
}

fn scenario_dirs(root: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(root).unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()));
    let mut dirs: Vec<PathBuf> =
        entries.map(|e| e.expect("readable directory entry").path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs
}

fn dir_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Run one scenario; `Err` is the whole report for that scenario.
fn check(dir: &Path, bless: bool) -> Result<(), String> {
    let name = dir_name(dir);
    let scenario = scenario::load(dir).map_err(|e| format!("=== {name}: does not load\n{e}"))?;
    let outcome = havirt::sim::run_scenario(&scenario);
    if !outcome.violations.is_empty() {
        return Err(format!(
            "=== {name}: {} invariant violation(s){}\n{}\n--- log ---\n{}",
            outcome.violations.len(),
            if bless { " (log.expect not written)" } else { "" },
            outcome.violations.join("\n"),
            outcome.log
        ));
    }
    let expect_path = dir.join("log.expect");
    if bless {
        return std::fs::write(&expect_path, &outcome.log)
            .map_err(|e| format!("=== {name}: cannot write {}: {e}", expect_path.display()));
    }
    let expected = match std::fs::read_to_string(&expect_path) {
        Ok(text) => text,
        Err(e) => {
            return Err(format!(
                "=== {name}: cannot read {} ({e}); review the run and create it with \
                 HAVIRT_BLESS=1 cargo test --test golden {name}",
                expect_path.display()
            ));
        }
    };
    if expected == outcome.log {
        return Ok(());
    }
    let saved = save_actual(&name, &outcome.log);
    Err(format!("=== {name}: log differs from log.expect{saved}\n{}", diff(&expected, &outcome.log)))
}

/// Keep the actual log outside the source tree, for a closer look.
fn save_actual(name: &str, log: &str) -> String {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden");
    let path = dir.join(format!("{name}.log"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, log)) {
        Ok(()) => format!(" (actual log: {})", path.display()),
        Err(_) => String::new(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Edit {
    Same,
    Removed,
    Added,
}

/// A unified-style line diff (`-` expected, `+` actual) with hunk headers.
fn diff(expected: &str, actual: &str) -> String {
    let old: Vec<&str> = expected.lines().collect();
    let new: Vec<&str> = actual.lines().collect();
    let prefix = old.iter().zip(&new).take_while(|(a, b)| a == b).count();
    let suffix = old[prefix..].iter().rev().zip(new[prefix..].iter().rev()).take_while(|(a, b)| a == b).count();
    let old_mid = &old[prefix..old.len() - suffix];
    let new_mid = &new[prefix..new.len() - suffix];
    let mut out = String::from("--- log.expect\n+++ actual\n");
    if old_mid.is_empty() && new_mid.is_empty() {
        // Only line endings or a final newline differ.
        out.push_str("(the logs differ only in line endings or the final newline)\n");
        return out;
    }
    if old_mid.len() > DIFF_LINES_MAX || new_mid.len() > DIFF_LINES_MAX {
        let line = prefix + 1;
        let _ = writeln!(
            out,
            "(changed part too long for a full diff; first difference at line {line})\n-{}\n+{}",
            old_mid.first().unwrap_or(&"<end of file>"),
            new_mid.first().unwrap_or(&"<end of file>")
        );
        return out;
    }
    let mut edits: Vec<(Edit, &str)> = old[..prefix].iter().map(|l| (Edit::Same, *l)).collect();
    edits.extend(lcs_edits(old_mid, new_mid));
    edits.extend(old[old.len() - suffix..].iter().map(|l| (Edit::Same, *l)));
    render_hunks(&edits, &mut out);
    out
}

/// Edit script between two line lists from a longest-common-subsequence table.
fn lcs_edits<'a>(old: &[&'a str], new: &[&'a str]) -> Vec<(Edit, &'a str)> {
    let (n, m) = (old.len(), new.len());
    // table[i][j]: LCS length of old[i..] and new[j..].
    let mut table = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            table[i][j] = if old[i] == new[j] { table[i + 1][j + 1] + 1 } else { table[i + 1][j].max(table[i][j + 1]) };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut edits = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            edits.push((Edit::Same, old[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < n && (j == m || table[i + 1][j] >= table[i][j + 1]) {
            // Removals first on a tie, as `diff -u` prints them.
            edits.push((Edit::Removed, old[i]));
            i += 1;
        } else {
            edits.push((Edit::Added, new[j]));
            j += 1;
        }
    }
    edits
}

/// Print changes with `DIFF_CONTEXT_LINES` of context, as `diff -u` does.
fn render_hunks(edits: &[(Edit, &str)], out: &mut String) {
    let changed: Vec<usize> = (0..edits.len()).filter(|&k| edits[k].0 != Edit::Same).collect();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(DIFF_CONTEXT_LINES);
        let mut last = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= last + 2 * DIFF_CONTEXT_LINES + 1 {
            k += 1;
            last = changed[k];
        }
        let end = (last + DIFF_CONTEXT_LINES + 1).min(edits.len());
        let line_of = |until: usize, skip: Edit| 1 + edits[..until].iter().filter(|(e, _)| *e != skip).count();
        let _ = writeln!(out, "@@ -{} +{} @@", line_of(start, Edit::Added), line_of(start, Edit::Removed));
        for (edit, line) in &edits[start..end] {
            let mark = match edit {
                Edit::Same => ' ',
                Edit::Removed => '-',
                Edit::Added => '+',
            };
            let _ = writeln!(out, "{mark}{line}");
        }
        k += 1;
    }
}

fn diff_shows_changes_with_context_and_line_numbers() -> Result<(), Failed> {
    let expected = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\n";
    let actual = "a\nb\nc\nd\nE\nf\ng\nh\ni\nj\nk\nl\nm\nn\no\n";
    let text = diff(expected, actual);
    let want = "--- log.expect\n+++ actual\n\
                @@ -2 +2 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n\
                @@ -12 +12 @@\n l\n m\n n\n+o\n";
    if text != want {
        return Err(format!("diff gave\n{text}\nwanted\n{want}").into());
    }
    if !diff("a\n", "a").contains("only in line endings") {
        return Err("a missing final newline is not named".into());
    }
    Ok(())
}
