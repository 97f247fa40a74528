//! cloud-init's NoCloud seed: a small FAT disk labelled `CIDATA` with the
//! files `user-data`, `meta-data` and (when given) `network-config` at its
//! root, which cloud-init finds by its label (`blkid -t LABEL=cidata`, case
//! ignored) and reads on boot. The node makes it at each start from the
//! Domain's `spec.cloudInit`, in the activation's run directory, and the
//! drivers attach it read-only after the Domain's own disks.

use std::io::{Cursor, Seek, SeekFrom, Write};

use vireo_crds::CloudInit;

/// The volume label cloud-init looks for (FAT labels are upper case).
const LABEL: [u8; 11] = *b"CIDATA     ";

/// What goes into the seed, every document inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    pub network_config: Option<String>,
}

impl Seed {
    /// The documents of `spec.cloudInit` for a Domain with this UUID and
    /// name (`ns/name` or `name`); an error names a field still given by
    /// reference (only the cluster agent reads Secrets and ConfigMaps).
    pub fn from_spec(ci: &CloudInit, uuid: &str, domain: &str) -> Result<Seed, String> {
        for (field, set) in [
            ("userDataFrom", ci.user_data_from.is_some()),
            ("metaDataFrom", ci.meta_data_from.is_some()),
            ("networkConfigFrom", ci.network_config_from.is_some()),
        ] {
            if set {
                return Err(format!(
                    "spec.cloudInit.{field}: a Secret or ConfigMap is read by the cluster's agent; give the document inline here"
                ));
            }
        }
        let meta_data = match &ci.meta_data {
            Some(m) => m.clone(),
            None => {
                let host = ci.hostname.clone().unwrap_or_else(|| host_name(domain));
                format!("instance-id: {uuid}\nlocal-hostname: {host}\n")
            }
        };
        Ok(Seed {
            // cloud-init wants a user-data file even when there is nothing
            // to say; an empty cloud-config is that.
            user_data: ci
                .user_data
                .clone()
                .unwrap_or_else(|| "#cloud-config\n{}\n".into()),
            meta_data,
            network_config: ci.network_config.clone(),
        })
    }

    /// The FAT image.
    pub fn image(&self) -> std::io::Result<Vec<u8>> {
        let content = self.user_data.len()
            + self.meta_data.len()
            + self.network_config.as_ref().map_or(0, String::len);
        // FAT12 wants a few hundred sectors at least; room for the files
        // and their clusters on top, in whole MiB.
        let size = (1 << 20) + content.div_ceil(1 << 20) * (1 << 20) * 2;
        let mut disk = Cursor::new(vec![0u8; size]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new().volume_label(LABEL),
        )?;
        disk.seek(SeekFrom::Start(0))?;
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
            let mut files = vec![
                ("user-data", self.user_data.as_str()),
                ("meta-data", self.meta_data.as_str()),
            ];
            if let Some(n) = &self.network_config {
                files.push(("network-config", n.as_str()));
            }
            for (name, text) in files {
                let mut f = fs.root_dir().create_file(name)?;
                f.truncate()?;
                f.write_all(text.as_bytes())?;
                f.flush()?;
            }
            fs.unmount()?;
        }
        Ok(disk.into_inner())
    }
}

/// A host name from a Domain name: the part after the namespace, lower
/// case, other characters than letters, digits and '-' made '-'.
fn host_name(domain: &str) -> String {
    let name = domain.rsplit('/').next().unwrap_or(domain);
    let mut h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    h = h.trim_matches('-').to_string();
    if h.is_empty() { "vireo".into() } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_back(image: Vec<u8>) -> (String, Vec<(String, String)>) {
        let mut disk = Cursor::new(image);
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).expect("a FAT");
        let label = fs.volume_label();
        let mut files = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.expect("entry");
            if e.is_file() {
                let mut text = String::new();
                e.to_file().read_to_string(&mut text).expect("read");
                files.push((e.file_name(), text));
            }
        }
        files.sort();
        (label, files)
    }

    #[test]
    fn the_seed_is_a_cidata_fat_with_nocloud_files() {
        let ci = CloudInit {
            hostname: Some("web01".into()),
            user_data: Some("#cloud-config\nruncmd: [echo hi]\n".into()),
            network_config: Some("version: 2\n".into()),
            ..Default::default()
        };
        let seed = Seed::from_spec(&ci, "5b1c0e6e-0000-4000-8000-000000000001", "default/web")
            .expect("seed");
        let (label, files) = read_back(seed.image().expect("image"));
        assert_eq!(label.trim_end(), "CIDATA");
        assert_eq!(
            files,
            vec![
                (
                    "meta-data".to_string(),
                    "instance-id: 5b1c0e6e-0000-4000-8000-000000000001\nlocal-hostname: web01\n"
                        .to_string()
                ),
                ("network-config".to_string(), "version: 2\n".to_string()),
                (
                    "user-data".to_string(),
                    "#cloud-config\nruncmd: [echo hi]\n".to_string()
                ),
            ]
        );
    }

    #[test]
    fn defaults_and_large_documents() {
        let big = format!(
            "#cloud-config\nwrite_files: [{{path: /x, content: '{}'}}]\n",
            "a".repeat(3 << 20)
        );
        let ci = CloudInit {
            user_data: Some(big.clone()),
            ..Default::default()
        };
        let seed = Seed::from_spec(&ci, "u", "ns/My_VM").expect("seed");
        assert_eq!(seed.meta_data, "instance-id: u\nlocal-hostname: my-vm\n");
        let (_, files) = read_back(seed.image().expect("image"));
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].1, big, "a document larger than a MiB is whole");
        let empty = Seed::from_spec(&CloudInit::default(), "u", "x").expect("seed");
        assert!(empty.user_data.starts_with("#cloud-config"));
    }

    #[test]
    fn references_are_for_the_cluster_agent() {
        let ci = CloudInit {
            user_data_from: Some(vireo_crds::DataSource {
                secret_key_ref: Some(vireo_crds::KeyRef {
                    name: "s".into(),
                    key: "k".into(),
                }),
                config_map_key_ref: None,
            }),
            ..Default::default()
        };
        let e = Seed::from_spec(&ci, "u", "x").expect_err("refused");
        assert!(e.starts_with("spec.cloudInit.userDataFrom:"), "{e}");
    }
}
