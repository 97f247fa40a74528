//! Which host files a Domain may boot from: `spec.os.kernel` and
//! `spec.os.initrd` are host paths, so a node checks them before it defines
//! the Domain. A path is accepted when, after every symbolic link and `..`
//! is resolved, it is a file under one of the node's boot directories, or
//! a volume (a regular file, not a link) of one of its active storage
//! pools. Anything else — `/etc/shadow`, `/var/lib/vireo/boot/../../etc`,
//! a link in the boot directory pointing out of it — is refused with the
//! field named. (Disks, `kernelVolume` and `initrdVolume` name StorageVols,
//! never paths, so they cannot point elsewhere.)

use std::path::{Path, PathBuf};

use vireo_crds::Domain;

use crate::storage::StorageDriver;

/// Why `def`'s boot files are refused, naming the field; `None` when every
/// one lies in `boot_dirs` or is a volume of `storage`'s pools.
pub fn refusal(
    def: &Domain,
    boot_dirs: &[PathBuf],
    storage: Option<&dyn StorageDriver>,
) -> Option<String> {
    let os = def.spec.os.as_ref()?;
    let allowed: Vec<PathBuf> = boot_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    for (field, path) in [
        ("spec.os.kernel", &os.kernel),
        ("spec.os.initrd", &os.initrd),
    ] {
        let Some(path) = path.as_deref() else {
            continue;
        };
        if !is_allowed(path, &allowed, storage) {
            let dirs = if boot_dirs.is_empty() {
                "none".to_string()
            } else {
                boot_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Some(format!(
                "{field}: '{path}' is outside the node's storage pools and its boot directories ({dirs})"
            ));
        }
    }
    None
}

fn is_allowed(path: &str, boot_dirs: &[PathBuf], storage: Option<&dyn StorageDriver>) -> bool {
    if path.is_empty() || !path.starts_with('/') {
        return false;
    }
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    if real.is_file() && boot_dirs.iter().any(|d| real.starts_with(d)) {
        return true;
    }
    let Some(storage) = storage else {
        return false;
    };
    // A pool's volume, named by its path as given or as resolved (the pool
    // backend accepts only a regular file directly in an active pool's
    // directory: no link, no `..`).
    [Path::new(path), real.as_path()]
        .iter()
        .filter_map(|p| p.to_str())
        .any(|p| storage.lookup_volume_by_path(p).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(kernel: &str, initrd: Option<&str>) -> Domain {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vireo.dev/v1alpha1",
            "kind": "Domain",
            "metadata": {"name": "d"},
            "spec": {"type": "kvm", "memory": "64Mi", "vcpus": 1,
                     "os": {"kernel": kernel, "initrd": initrd}},
        }))
        .unwrap()
    }

    #[test]
    fn only_files_in_boot_dirs_and_pools_after_links_are_resolved() {
        let base = std::env::temp_dir().join(format!("vireo-host-paths-{}", std::process::id()));
        let boot = base.join("boot");
        let pool = base.join("pool");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::write(boot.join("vmlinuz"), b"k").unwrap();
        std::fs::write(base.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), boot.join("escape")).unwrap();
        std::os::unix::fs::symlink(boot.join("vmlinuz"), base.join("link-in")).unwrap();
        let dirs = vec![boot.clone()];
        let ok = |k: &str, i: Option<&str>| refusal(&domain(k, i), &dirs, None);

        assert_eq!(ok(boot.join("vmlinuz").to_str().unwrap(), None), None);
        // A link from outside to a file inside is fine: the file is inside.
        assert_eq!(ok(base.join("link-in").to_str().unwrap(), None), None);
        for bad in [
            "/etc/shadow".to_string(),
            base.join("secret").display().to_string(),
            boot.join("escape").display().to_string(),
            format!("{}/../secret", boot.display()),
            boot.join("missing").display().to_string(),
            boot.display().to_string(),
            "vmlinuz".to_string(),
            String::new(),
        ] {
            let why = ok(&bad, None).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(
                why.starts_with("spec.os.kernel: ") && why.contains("outside"),
                "{why}"
            );
            assert!(why.contains(&boot.display().to_string()), "{why}");
        }
        let why = ok(boot.join("vmlinuz").to_str().unwrap(), Some("/etc/passwd")).unwrap();
        assert!(
            why.starts_with("spec.os.initrd: '/etc/passwd' is outside"),
            "{why}"
        );
        // No boot directory at all: nothing is allowed outside the pools.
        assert!(
            refusal(
                &domain(boot.join("vmlinuz").to_str().unwrap(), None),
                &[],
                None
            )
            .is_some()
        );
        std::fs::remove_dir_all(&base).ok();
    }
}
