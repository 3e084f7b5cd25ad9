//! Private-key files (`sslkey` in `DATABASE_URL`, `AMQP_CLIENT_KEY_FILE`): whether anyone
//! but their owner can read them. libpq refuses such a key outright; the service warns at
//! start-up instead (a Kubernetes secret is mounted `0644` unless `defaultMode` says
//! otherwise, and refusing would turn a hardening hint into an outage).

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

/// A warning when the private key at `path` (named by `setting`) is readable by group or
/// others: libpq's rule is `0600` or less, or `0640` or less when owned by root. `None`
/// when it is private enough or cannot be read (reading it reports that elsewhere).
pub fn exposure_warning(setting: &str, path: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    let private = mode & 0o077 == 0 || (meta.uid() == 0 && mode & 0o037 == 0);
    (!private).then(|| {
        format!(
            "{setting} {path} can be read by others than its owner (mode {mode:04o}); \
             make it 0600 (or 0640 owned by root; in Kubernetes, defaultMode 0400 with fsGroup 10001, as deploy/k8s does)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_readable_by_others_is_reported_and_a_private_one_is_not() {
        let dir = std::env::temp_dir().join(format!("vote-key-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = dir.join("client.key");
        std::fs::write(&key, "k").expect("write");
        let path = key.display().to_string();
        let set = |mode| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(0o644);
        let warning = exposure_warning("sslkey", &path).expect("a warning for 0644");
        assert!(
            warning.contains("mode 0644") && warning.contains("sslkey"),
            "{warning}"
        );
        set(0o600);
        assert_eq!(exposure_warning("sslkey", &path), None);
        assert_eq!(exposure_warning("sslkey", "/nonexistent/key"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
