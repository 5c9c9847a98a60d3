//! The Debian package's man pages and shell completions, written from the
//! CLI definition itself by the hidden `havirt generate-docs DIR` (run by
//! `.ci/deb`). Generated at package time, not kept in the tree, so every
//! subcommand added later is documented without anyone remembering to.
//!
//! DIR is laid out like /usr/share, so that each file's Debian location is
//! its path under DIR:
//! - `man/man1/havirt.1`, and `havirt-SUB.1` (`havirt-lab-up.1`, ...) for
//!   every subcommand that `--help` shows (hidden ones stay undocumented);
//! - `bash-completion/completions/havirt`, `zsh/vendor-completions/_havirt`,
//!   `fish/vendor_completions.d/havirt.fish`.
//!
//! Man pages are written uncompressed; the packager gzips them (Debian policy
//! wants `gzip -9n`, which has no pure-Rust twin here worth a dependency).

use clap_complete::Shell;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot write {path}: {reason}; give `havirt generate-docs` a directory it may create and write")]
    Write { path: PathBuf, reason: String },
}

/// Where Debian's shells look for vendor completions, relative to
/// /usr/share, with `{}` standing for the program's name.
const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions/{}"),
    (Shell::Zsh, "zsh/vendor-completions/_{}"),
    (Shell::Fish, "fish/vendor_completions.d/{}.fish"),
];

/// Writes the man pages and completions of `cmd` under `dir` (created if
/// missing) and returns the files written, man pages first, each sorted.
pub fn generate(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let name = cmd.get_name().to_string();
    let man_dir = dir.join("man/man1");
    create_dir(&man_dir)?;
    clap_mangen::generate_to(cmd.clone(), &man_dir).map_err(|e| write_error(&man_dir, &e))?;
    let mut written = list_dir(&man_dir)?;
    written.sort();
    let mut visible = without_hidden(&cmd);
    for (shell, pattern) in COMPLETIONS {
        let path = dir.join(pattern.replace("{}", &name));
        create_dir(path.parent().unwrap_or(dir))?;
        let mut file = std::fs::File::create(&path).map_err(|e| write_error(&path, &e))?;
        clap_complete::generate(shell, &mut visible, &name, &mut file);
        written.push(path);
    }
    Ok(written)
}

/// `cmd` less its hidden subcommands, for the completions: clap_complete
/// offers hidden subcommands (clap issue 1335; clap_mangen drops them) and
/// clap has no way to remove one, so the tree is rebuilt from what the
/// generators read: name, about, version, arguments, groups, subcommands.
/// `cmd` must not be built yet (its arguments would include --help twice).
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string())
        .args(cmd.get_arguments().cloned())
        .groups(cmd.get_groups().cloned());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(version.to_string());
    }
    out.subcommands(cmd.get_subcommands().filter(|sub| !sub.is_hide_set()).map(without_hidden))
}

fn create_dir(dir: &Path) -> Result<(), DocsError> {
    std::fs::create_dir_all(dir).map_err(|e| write_error(dir, &e))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| write_error(dir, &e))?;
    entries.map(|entry| entry.map(|e| e.path()).map_err(|e| write_error(dir, &e))).collect()
}

fn write_error(path: &Path, e: &std::io::Error) -> DocsError {
    DocsError::Write { path: path.to_path_buf(), reason: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> clap::Command {
        clap::Command::new("toy")
            .version("1.2.3")
            .about("A toy")
            .subcommand(
                clap::Command::new("run")
                    .about("Runs")
                    .arg(clap::Arg::new("speed").long("speed"))
                    .subcommand(clap::Command::new("fast"))
                    .subcommand(clap::Command::new("sneaky").hide(true)),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn writes_a_page_per_visible_subcommand_and_three_completions() {
        let dir = std::env::temp_dir().join(format!("havirt-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = generate(toy(), &dir).expect("generate");
        let names: Vec<String> =
            written.iter().map(|p| p.strip_prefix(&dir).expect("under dir").display().to_string()).collect();
        assert_eq!(
            names,
            [
                "man/man1/toy-run-fast.1",
                "man/man1/toy-run.1",
                "man/man1/toy.1",
                "bash-completion/completions/toy",
                "zsh/vendor-completions/_toy",
                "fish/vendor_completions.d/toy.fish",
            ]
        );
        let page = std::fs::read_to_string(dir.join("man/man1/toy.1")).expect("page");
        assert!(page.contains("toy\\-run") && page.contains("1.2.3"), "{page}");
        assert!(!page.contains("secret"), "a hidden subcommand is documented: {page}");
        let run = std::fs::read_to_string(dir.join("man/man1/toy-run.1")).expect("page");
        assert!(run.contains("speed") && !run.contains("sneaky"), "{run}");
        for (shell, pattern) in COMPLETIONS {
            let script = std::fs::read_to_string(dir.join(pattern.replace("{}", "toy"))).expect("completion");
            assert!(script.contains("run") && script.contains("speed"), "{shell}: {script}");
            assert!(!script.contains("secret") && !script.contains("sneaky"), "{shell} completes a hidden subcommand");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("havirt-docs-file-{}", std::process::id()));
        std::fs::write(&file, "").expect("file");
        let err = generate(toy(), &file.join("sub")).expect_err("a file is no directory");
        assert!(matches!(&err, DocsError::Write { path, .. } if path.starts_with(&file)), "{err}");
        std::fs::remove_file(&file).expect("cleanup");
    }
}
