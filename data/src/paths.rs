//! What is wrong with a path that cannot be opened, in words: a symbolic link loop (with its chain) or a
//! link to nothing, instead of the OS's "Too many levels of symbolic links (os error 40)" or a later,
//! misleading "not a directory" / "no config.json". Every error that names an unopenable file asks
//! here first. It does not open or read files.

use std::path::{Path, PathBuf};

/// Why `path` cannot be used, when the reason is a symbolic link: `None` for anything else (a plain
/// missing file, a permission error: the OS's own words say those well).
pub fn why_unusable(path: &Path) -> Option<String> {
    let mut chain: Vec<PathBuf> = vec![path.to_owned()];
    let mut at = path.to_owned();
    loop {
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc_eloop()) => return Some(LOOP_ABOVE.into()),
            Err(_) => return None,
        };
        if !meta.file_type().is_symlink() {
            // The path itself resolves; a loop further up its directories still shows as ELOOP.
            return match std::fs::metadata(path) {
                Err(e) if e.raw_os_error() == Some(libc_eloop()) => Some(LOOP_ABOVE.into()),
                _ => None,
            };
        }
        let target = std::fs::read_link(&at).ok()?;
        let next = at.parent().map_or(target.clone(), |p| p.join(&target));
        let show = |c: &[PathBuf]| c.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> ");
        if chain.contains(&next) || chain.len() > 40 {
            chain.push(next);
            return Some(format!(
                "is a symbolic link loop ({}); hint: point the link at the real file or directory",
                show(&chain)
            ));
        }
        if std::fs::symlink_metadata(&next).is_err() {
            chain.push(next);
            return Some(format!(
                "is a symbolic link to a path that does not exist ({}); hint: point the link at the real file or directory",
                show(&chain)
            ));
        }
        chain.push(next.clone());
        at = next;
    }
}

const LOOP_ABOVE: &str = "a directory on this path is a symbolic link loop; hint: fix or remove that link";

/// ELOOP on Linux (and most Unixes but macOS, where it is 62).
fn libc_eloop() -> i32 {
    if cfg!(target_os = "macos") {
        62
    } else {
        40
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_and_dangling_links_are_named_with_their_chain() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("a", &b).unwrap();
        let why = why_unusable(&a).unwrap();
        assert!(why.starts_with("is a symbolic link loop ("), "{why}");
        assert!(why.contains(&format!("{} -> {} -> {}", a.display(), b.display(), a.display())), "{why}");
        let c = d.path().join("c");
        std::os::unix::fs::symlink("nowhere.jsonl", &c).unwrap();
        let why = why_unusable(&c).unwrap();
        assert!(why.contains("does not exist") && why.contains("nowhere.jsonl"), "{why}");
        let inside = a.join("x.jsonl");
        assert!(why_unusable(&inside).is_some());
        std::fs::write(d.path().join("f"), "").unwrap();
        assert_eq!(why_unusable(&d.path().join("f")), None);
        assert_eq!(why_unusable(&d.path().join("missing")), None);
    }
}
