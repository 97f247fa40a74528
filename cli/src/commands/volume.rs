//! Storage volume commands: vol-list, vol-info, vol-create-as, vol-clone, ...

use anyhow::{Context, Result, bail};
use serde_json::json;
use vireo_crds::quantity::{format_bytes, human_bytes};
use vireo_crds::storage_vol::CloneSource;
use vireo_crds::{Manifest, StorageVol, StorageVolSpec, VolFormat, VolumeSource};
use vireo_drivers::{Connection, Lookup, ResizeFlags, VolRef};

use super::{Command, read_manifests_in};
use crate::output::{Output, Table};

/// Finds a volume: by name in `--pool`, else by key, else by path (as virsh does).
fn resolve(conn: &Connection, vol: &str, pool: Option<&str>) -> Result<VolRef> {
    let st = conn.storage();
    Ok(match pool {
        Some(p) => {
            let p = st.lookup_pool(Lookup::object(p))?;
            st.lookup_volume(&p.name, vol)?
        }
        None => match st.lookup_volume_by_key(vol) {
            Ok(v) => v,
            Err(_) => st.lookup_volume_by_path(vol).map_err(|_| {
                anyhow::anyhow!("storage volume '{vol}' not found (give --pool POOL, or the volume's key or path)")
            })?,
        },
    })
}

fn format_of(text: &str) -> Result<VolFormat> {
    match text {
        "raw" => Ok(VolFormat::Raw),
        "qcow2" => Ok(VolFormat::Qcow2),
        "iso" => Ok(VolFormat::Iso),
        other => bail!("format '{other}' is not one of raw, qcow2, iso"),
    }
}

fn size(text: &str) -> Result<u64> {
    crate::size::parse(text, 1).map_err(anyhow::Error::msg)
}

pub fn run(conn: &Connection, command: &Command) -> Result<Output> {
    let st = conn.storage();
    Ok(match command {
        Command::VolList(a) => {
            let pool_text = a
                .pool_opt
                .as_deref()
                .or(a.pool.as_deref())
                .unwrap_or_default();
            let pool = st.lookup_pool(Lookup::object(pool_text))?;
            let mut table = if a.details {
                Table::new(&["Name", "Path", "Type", "Capacity", "Allocation"])
            } else {
                Table::new(&["Name", "Path"])
            };
            let mut data = Vec::new();
            for v in st.list_volumes(&pool.name)? {
                let i = st.volume_info(&pool.name, &v.name)?;
                data.push(
                    json!({"name": i.name, "pool": i.pool, "path": i.path, "key": i.key,
                    "format": i.format, "capacity": i.capacity, "allocation": i.allocation}),
                );
                let mut row = vec![i.name, i.path];
                if a.details {
                    row.extend([
                        "file".into(),
                        human_bytes(i.capacity),
                        human_bytes(i.allocation),
                    ]);
                }
                table.row(row);
            }
            Output::Table {
                table,
                data: data.into(),
            }
        }
        Command::VolInfo(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            let i = st.volume_info(&v.pool, &v.name)?;
            // virsh's four lines; the format and path are in -o yaml|json,
            // vol-dumpxml and vol-path.
            let mut rows = vec![
                ("Name", i.name.clone()),
                ("Type", "file".into()),
                ("Capacity", human_bytes(i.capacity)),
                ("Allocation", human_bytes(i.allocation)),
            ];
            // Only for volumes made for an upload that has not completed.
            match (i.awaiting_upload, i.upload_progress) {
                (_, Some(pct)) => rows.push(("Content", format!("uploading, {pct}% done"))),
                (true, None) => rows.push(("Content", "waiting for vol-upload".into())),
                (false, None) => {}
            }
            Output::Fields {
                width: 15,
                data: json!({"name": i.name, "pool": i.pool, "path": i.path, "key": i.key,
                    "format": i.format, "capacity": i.capacity, "allocation": i.allocation,
                    "awaitingUpload": i.awaiting_upload, "uploadProgress": i.upload_progress}),
                rows,
            }
        }
        Command::VolPath(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            Output::Text {
                data: json!({"path": v.path}),
                text: v.path,
            }
        }
        Command::VolKey(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            Output::Text {
                data: json!({"key": v.key}),
                text: v.key,
            }
        }
        Command::VolName(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            Output::Text {
                data: json!({"name": v.name}),
                text: v.name,
            }
        }
        Command::VolPool(a) => {
            let v = resolve(conn, &a.vol, None)?;
            let text = if a.uuid {
                conn.storage().pool_info(&v.pool)?.uuid
            } else {
                v.pool.clone()
            };
            Output::Text {
                data: json!({"pool": v.pool}),
                text,
            }
        }
        Command::VolCreate(f) => {
            let manifests = read_manifests_in(
                &f.file,
                "StorageVol",
                "define, net-define or pool-define for other kinds",
                f.pool.as_deref(),
            )?;
            let mut lines = Vec::new();
            for m in manifests {
                let Manifest::StorageVol(v) = m else { continue };
                let r = st.create_volume(&v)?;
                lines.push(format!("Vol {} created from {}", r.name, f.file.display()));
            }
            Output::Message(lines.join("\n"))
        }
        Command::VolCreateAs(a) => {
            let pool = st.lookup_pool(Lookup::object(&a.pool))?;
            let capacity = size(&a.capacity)?;
            let allocation = a.allocation.as_deref().map(size).transpose()?;
            let vol = StorageVol::new(
                &a.name,
                StorageVolSpec {
                    pool: pool.name,
                    capacity: format_bytes(capacity),
                    allocation: allocation.map(format_bytes),
                    format: format_of(&a.format)?,
                    source: None,
                    node_name: None,
                },
            );
            let r = st.create_volume(&vol)?;
            Output::Message(format!("Vol {} created", r.name))
        }
        Command::VolClone(a) => {
            let src = resolve(conn, &a.vol, a.pool.as_deref())?;
            let info = st.volume_info(&src.pool, &src.name)?;
            let vol = StorageVol::new(
                &a.newname,
                StorageVolSpec {
                    pool: src.pool.clone(),
                    capacity: format_bytes(info.capacity),
                    allocation: None,
                    format: info.format,
                    source: Some(VolumeSource {
                        clone: Some(CloneSource {
                            volume: src.name.clone(),
                            overlay: false,
                        }),
                        ..VolumeSource::default()
                    }),
                    node_name: None,
                },
            );
            let r = st.create_volume(&vol)?;
            Output::Message(format!("Vol {} cloned from {}", r.name, src.name))
        }
        Command::VolResize(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            let flags = ResizeFlags {
                allocate: a.allocate,
                delta: a.delta,
                shrink: a.shrink,
            };
            st.resize_volume(&v.pool, &v.name, size(&a.capacity)?, flags)?;
            Output::Message(format!(
                "Size of volume '{}' successfully changed to {}",
                v.name, a.capacity
            ))
        }
        Command::VolWipe(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            st.wipe_volume(&v.pool, &v.name)?;
            Output::Message(format!("Vol {} wiped", v.name))
        }
        Command::VolDumpxml(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            let i = st.volume_info(&v.pool, &v.name)?;
            let xml = vireo_crds::libvirt_xml::volume_to_xml(
                &i.name,
                i.capacity,
                i.allocation,
                &i.path,
                i.format,
            );
            Output::Text {
                data: json!({"xml": xml}),
                text: xml.trim_end().to_string(),
            }
        }
        Command::VolDelete(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            st.delete_volume(&v.pool, &v.name)?;
            Output::Message(format!("Vol {} deleted", v.name))
        }
        Command::VolUpload(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            let file = if a.file == std::path::Path::new("-") {
                None
            } else {
                Some(
                    std::fs::File::open(&a.file)
                        .with_context(|| format!("cannot open {}", a.file.display()))?,
                )
            };
            let length = match &file {
                // A file given with --length is read as a stream of that
                // many bytes; otherwise as a file (its holes skipped).
                Some(f) => a.length.or_else(|| f.metadata().map(|m| m.len()).ok()),
                None => a.length,
            };
            let bar = progress_bar(length);
            let progress = |done: u64, total: Option<u64>| {
                if let Some(t) = total {
                    bar.set_length(t);
                }
                bar.set_position(done);
            };
            let n = match file {
                Some(f) if a.length.is_none() => {
                    st.upload_volume_from_file(&v.pool, &v.name, &f, &progress)
                }
                Some(f) => st.upload_volume(&v.pool, &v.name, &mut &f, length, &progress),
                None => st.upload_volume(
                    &v.pool,
                    &v.name,
                    &mut std::io::stdin().lock(),
                    length,
                    &progress,
                ),
            };
            bar.finish_and_clear();
            let n = n?;
            Output::Message(format!(
                "Uploaded {} into volume '{}'",
                human_bytes(n),
                v.name
            ))
        }
        Command::VolDownload(a) => {
            let v = resolve(conn, &a.vol, a.pool.as_deref())?;
            // Into a temporary name beside the target, renamed when complete.
            let tmp = a.file.with_extension("vireo-download");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let bar = progress_bar(None);
            let progress = |done: u64, total: Option<u64>| {
                if let Some(t) = total {
                    bar.set_length(t);
                }
                bar.set_position(done);
            };
            // Holes in the volume stay holes in the file.
            let n = st.download_volume_to_file(&v.pool, &v.name, &file, &progress);
            bar.finish_and_clear();
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            };
            file.sync_all()?;
            std::fs::rename(&tmp, &a.file)
                .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
            Output::Message(format!(
                "Downloaded {} of volume '{}' to {}",
                human_bytes(n),
                v.name,
                a.file.display()
            ))
        }
        _ => bail!("not a volume command"),
    })
}

/// A byte progress bar on stderr; hidden when stderr is not a terminal.
fn progress_bar(length: Option<u64>) -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(length, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}
