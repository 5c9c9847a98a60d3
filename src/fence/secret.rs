//! Fence password files (DESIGN.md §8: credentials are never logged).
//!
//! A password file holds the password on its first line (as ipmitool's
//! `-f` reads it); a trailing `\n` or `\r\n` is not part of it. It must be a
//! regular file that group and others cannot read: the mode is taken from
//! the opened file, so it is the file that is read.

use super::FenceError;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A password file larger than this is some other file.
pub const PASSWORD_FILE_MAX_BYTES: u64 = 4096;

/// A password in memory: no `Display`, a `Debug` that hides it, and its
/// bytes overwritten when dropped (best effort: copies made by the
/// allocator or the kernel are out of reach).
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    #[cfg(test)]
    pub fn for_test(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

/// Refuse a password file that group or others can read.
pub fn check_mode(agent: &str, path: &Path) -> Result<std::fs::File, FenceError> {
    let unreadable =
        |reason: String| FenceError::PasswordFile { agent: agent.into(), path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unreadable("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FenceError::PasswordFileMode { agent: agent.into(), path: path.to_path_buf(), mode });
    }
    if meta.len() > PASSWORD_FILE_MAX_BYTES {
        return Err(unreadable(format!("{} bytes is too large (limit {PASSWORD_FILE_MAX_BYTES})", meta.len())));
    }
    Ok(file)
}

/// Check the file ([`check_mode`]) and read the password from it.
pub fn read_password(agent: &str, path: &Path) -> Result<Secret, FenceError> {
    let file = check_mode(agent, path)?;
    let unreadable =
        |reason: String| FenceError::PasswordFile { agent: agent.into(), path: path.to_path_buf(), reason };
    let mut raw = Vec::new();
    let read = file.take(PASSWORD_FILE_MAX_BYTES + 1).read_to_end(&mut raw);
    let parsed = match read {
        Ok(_) => first_line(&raw),
        Err(e) => Err(e.to_string()),
    };
    raw.fill(0);
    std::hint::black_box(&raw);
    parsed.map_err(unreadable)
}

/// The password on the first line of `raw`. The reasons never quote it.
fn first_line(raw: &[u8]) -> Result<Secret, String> {
    let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err("the first line is empty".into());
    }
    let text = std::str::from_utf8(line).map_err(|_| "the password is not valid UTF-8".to_owned())?;
    if text.chars().any(char::is_control) {
        return Err("the password holds a control character".into());
    }
    Ok(Secret(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_strips_line_ends() {
        assert_eq!(first_line(b"pw\n").map(|s| s.expose().to_owned()), Ok("pw".into()));
        assert_eq!(first_line(b"pw\r\nrest\n").map(|s| s.expose().to_owned()), Ok("pw".into()));
        assert_eq!(first_line(b"p w=x").map(|s| s.expose().to_owned()), Ok("p w=x".into()));
    }

    #[test]
    fn first_line_refuses_empty_and_control_characters() {
        assert!(first_line(b"").is_err());
        assert!(first_line(b"\nsecond").is_err());
        let e = first_line(b"a\x00b").map(|_| ()).expect_err("NUL refused");
        assert!(!e.contains("a\u{0}b"), "{e}");
    }

    #[test]
    fn debug_hides_the_password() {
        assert_eq!(format!("{:?}", Secret::for_test("hunter2")), "Secret(********)");
    }
}
