//! The dir storage backend on real files: the conformance suite's pool and
//! volume cases (domains and networks come from the test driver beside it),
//! then what only real files show: qcow2 images and overlays made by
//! qemu-img, files put in a pool by hand, URL fills from a loopback HTTP
//! server with progress, uploads and downloads, interrupted fills that never
//! show up as volumes, and qcow2 headers that point outside the pool.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vireo_crds::quantity::format_bytes;
use vireo_crds::{
    CloneSource, StoragePool, StorageVol, StorageVolSpec, UrlSource, VolFormat, VolumeSource,
};
use vireo_drivers::storage::dir::{DirStorage, qemu_img};
use vireo_drivers::storage::no_progress;
use vireo_drivers::{Connection, Error, StorageDriver};

fn connection() -> Connection {
    let root = common::fresh_root("dir-conf");
    let test = Arc::new(vireo_drivers::test::TestDriver::default_node());
    let dir = Arc::new(DirStorage::open(&root.join("storage"), Path::new("/")).expect("opens"));
    Connection::new("test+dir:///", test.clone(), test, dir)
}

fn fixture() -> vireo_drivers::conformance::Fixture {
    let base = vireo_drivers::conformance::test_driver_fixture();
    vireo_drivers::conformance::Fixture {
        make_pool: Box::new(common::dir_pool),
        ..base
    }
}

vireo_drivers::conformance_tests!(connection, fixture());

const MIB: u64 = 1 << 20;

/// A running pool of the given name on its own tmpfs, and its driver.
fn running_pool(name: &str) -> (DirStorage, PathBuf) {
    let root = common::fresh_root(&format!("dir-{name}"));
    let st = DirStorage::open(&root.join("storage"), Path::new("/")).expect("opens");
    let pool: StoragePool = common::dir_pool(name);
    let dir = PathBuf::from(&pool.spec.path);
    // Left over from an earlier run of this test in the same process: none.
    for e in std::fs::read_dir(&dir).expect("pool dir").flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    st.define_pool(&pool).expect("define");
    st.build_pool(name).expect("build");
    st.start_pool(name).expect("start");
    (st, dir)
}

fn volume(pool: &str, name: &str, capacity: u64, format: VolFormat) -> StorageVol {
    StorageVol::new(
        name,
        StorageVolSpec {
            pool: pool.into(),
            capacity: format_bytes(capacity),
            allocation: None,
            format,
            source: None,
            node_name: None,
        },
    )
}

fn with_source(mut v: StorageVol, source: VolumeSource) -> StorageVol {
    v.spec.source = Some(source);
    v
}

fn need_qemu_img(test: &str) -> bool {
    if qemu_img::available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: qemu-img is missing (scripts/setup installs qemu-utils)");
    }
    common::say(&format!(
        "SKIP {test}: qemu-img is not installed (apt-get install qemu-utils)"
    ));
    false
}

#[test]
fn raw_volumes_are_sparse_files_and_hand_made_files_appear() {
    let (st, dir) = running_pool("dir-raw");
    st.create_volume(&volume("dir-raw", "disk", 64 * MIB, VolFormat::Raw))
        .expect("create");
    let meta = std::fs::metadata(dir.join("disk")).expect("the file exists");
    assert_eq!(meta.len(), 64 * MIB);
    let info = st.volume_info("dir-raw", "disk").expect("info");
    assert_eq!(info.capacity, 64 * MIB);
    assert!(
        info.allocation < MIB,
        "a blank raw volume is sparse: {info:?}"
    );
    assert_eq!(info.path, dir.join("disk").display().to_string());

    // A file put there by hand is a volume on the next look; hidden files,
    // directories and links are not.
    std::fs::write(dir.join("by-hand.img"), vec![7u8; 4096]).expect("write");
    std::fs::write(dir.join(".hidden"), b"x").expect("write");
    std::fs::create_dir(dir.join("subdir")).expect("mkdir");
    std::os::unix::fs::symlink("/etc/hostname", dir.join("link")).expect("symlink");
    st.refresh_pool("dir-raw").expect("refresh");
    let names: Vec<String> = st
        .list_volumes("dir-raw")
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["by-hand.img", "disk"]);
    let e = st
        .volume_info("dir-raw", "link")
        .expect_err("a link is no volume");
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert_eq!(
        st.volume_info("dir-raw", "by-hand.img")
            .expect("info")
            .capacity,
        4096
    );
    for n in ["link", ".hidden"] {
        let _ = std::fs::remove_file(dir.join(n));
    }
    let _ = std::fs::remove_dir(dir.join("subdir"));
}

#[test]
fn qcow2_volumes_overlays_clones_resize_and_wipe() {
    if !need_qemu_img("qcow2 volumes") {
        return;
    }
    let (st, dir) = running_pool("dir-qcow2");
    let pool = "dir-qcow2";
    st.create_volume(&volume(pool, "base", 32 * MIB, VolFormat::Raw))
        .expect("raw base");
    // Data in the base, seen through an overlay and a full qcow2 copy.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("base"))
            .expect("open base");
        f.write_all(b"VIREO-BASE-DATA").expect("write");
    }
    let overlay = with_source(
        volume(pool, "overlay", 64 * MIB, VolFormat::Qcow2),
        VolumeSource {
            clone: Some(CloneSource {
                volume: "base".into(),
                overlay: true,
            }),
            ..VolumeSource::default()
        },
    );
    st.create_volume(&overlay).expect("overlay");
    let info = st.volume_info(pool, "overlay").expect("info");
    assert_eq!((info.format, info.capacity), (VolFormat::Qcow2, 64 * MIB));

    // The backing volume cannot go while the overlay needs it.
    let e = st.delete_volume(pool, "base").expect_err("base is in use");
    assert!(
        e.to_string().contains("backing file of volume 'overlay'"),
        "{e}"
    );

    // A raw overlay is refused, naming the field.
    let bad = with_source(
        volume(pool, "bad-overlay", 64 * MIB, VolFormat::Raw),
        overlay.spec.source.clone().expect("source"),
    );
    let e = st.create_volume(&bad).expect_err("raw overlay");
    assert!(e.to_string().contains("spec.format"), "{e}");

    // A full copy of the overlay to raw has the base's data.
    let copy = with_source(
        volume(pool, "flat", 64 * MIB, VolFormat::Raw),
        VolumeSource {
            clone: Some(CloneSource {
                volume: "overlay".into(),
                overlay: false,
            }),
            ..VolumeSource::default()
        },
    );
    st.create_volume(&copy).expect("flatten");
    let mut head = [0u8; 15];
    std::fs::File::open(dir.join("flat"))
        .and_then(|mut f| f.read_exact(&mut head))
        .expect("read flat");
    assert_eq!(&head, b"VIREO-BASE-DATA");
    assert_eq!(
        st.volume_info(pool, "flat").expect("info").capacity,
        64 * MIB
    );

    // qcow2 resize through qemu-img, shrink only with the flag.
    st.resize_volume(pool, "overlay", 96 * MIB, Default::default())
        .expect("grow");
    assert_eq!(
        st.volume_info(pool, "overlay").expect("info").capacity,
        96 * MIB
    );

    // Wipe keeps the size and the backing file.
    st.wipe_volume(pool, "overlay").expect("wipe");
    let info = st.volume_info(pool, "overlay").expect("info");
    assert_eq!((info.format, info.capacity), (VolFormat::Qcow2, 96 * MIB));

    st.delete_volume(pool, "overlay").expect("delete overlay");
    st.delete_volume(pool, "base").expect("then the base");
}

/// Serves `body` once per connection on loopback; `cut` stops after that
/// many bytes while announcing the whole length (a transfer that breaks).
fn serve(body: Vec<u8>, cut: Option<usize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let end = cut.unwrap_or(body.len()).min(body.len());
            let _ = conn.write_all(&body[..end]);
        }
    });
    format!("http://{addr}/image.img")
}

fn url_volume(pool: &str, name: &str, capacity: u64, format: VolFormat, url: &str) -> StorageVol {
    with_source(
        volume(pool, name, capacity, format),
        VolumeSource {
            url: Some(UrlSource { url: url.into() }),
            ..VolumeSource::default()
        },
    )
}

#[test]
fn url_fills_report_progress_and_a_broken_transfer_leaves_no_volume() {
    let (st, dir) = running_pool("dir-url");
    let pool = "dir-url";
    let mut image = vec![0u8; 6 * MIB as usize];
    image[..12].copy_from_slice(b"VIREO-IMAGE!");
    let last = image.len() - 4;
    image[last..].copy_from_slice(b"TAIL");
    let url = serve(image.clone(), None);

    let seen = Mutex::new(Vec::new());
    let progress = |done: u64, total: Option<u64>| {
        seen.lock().unwrap().push((done, total));
    };
    st.create_volume_with_progress(
        &url_volume(pool, "fetched", 16 * MIB, VolFormat::Raw, &url),
        &progress,
    )
    .expect("fill from URL");
    let data = std::fs::read(dir.join("fetched")).expect("read");
    assert_eq!(data.len() as u64, 16 * MIB, "grown to the capacity");
    assert_eq!(&data[..image.len()], &image[..]);
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.first(), Some(&(0, Some(image.len() as u64))));
    assert_eq!(
        seen.last(),
        Some(&(image.len() as u64, Some(image.len() as u64)))
    );

    // The connection breaks half way: no volume, no file left that claims to be one.
    let broken = serve(image.clone(), Some(3 * MIB as usize));
    let e = st
        .create_volume(&url_volume(
            pool,
            "broken",
            16 * MIB,
            VolFormat::Raw,
            &broken,
        ))
        .expect_err("a broken transfer fails");
    assert!(matches!(e, Error::OperationFailed { .. }), "{e}");
    assert!(
        e.to_string().contains("broken"),
        "the error names the volume: {e}"
    );
    assert!(!dir.join("broken").exists());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["fetched"], "nothing else in the pool: {left:?}");

    // A raw image bigger than the capacity is refused before it is written.
    let e = st
        .create_volume(&url_volume(pool, "small", 4 * MIB, VolFormat::Raw, &url))
        .expect_err("too big");
    assert!(e.to_string().contains("more than"), "{e}");
    assert!(!dir.join("small").exists());

    // An unreachable server is a clear error.
    let e = st
        .create_volume(&url_volume(
            pool,
            "nowhere",
            4 * MIB,
            VolFormat::Raw,
            "http://127.0.0.1:9/x",
        ))
        .expect_err("no server");
    assert!(e.to_string().contains("GET http://127.0.0.1:9/x"), "{e}");
}

#[test]
fn url_fills_convert_to_the_format_asked_for() {
    if !need_qemu_img("URL fill converted to qcow2") {
        return;
    }
    let (st, dir) = running_pool("dir-url-qcow2");
    let pool = "dir-url-qcow2";
    let mut image = vec![0u8; 2 * MIB as usize];
    image[..5].copy_from_slice(b"HELLO");
    let url = serve(image, None);
    st.create_volume(&url_volume(pool, "img", 8 * MIB, VolFormat::Qcow2, &url))
        .expect("fill and convert");
    let info = st.volume_info(pool, "img").expect("info");
    assert_eq!((info.format, info.capacity), (VolFormat::Qcow2, 8 * MIB));
    // Back to raw through a full copy: the data survived both conversions.
    let copy = with_source(
        volume(pool, "raw-again", 8 * MIB, VolFormat::Raw),
        VolumeSource {
            clone: Some(CloneSource {
                volume: "img".into(),
                overlay: false,
            }),
            ..VolumeSource::default()
        },
    );
    st.create_volume(&copy).expect("copy");
    let data = std::fs::read(dir.join("raw-again")).expect("read");
    assert_eq!(&data[..5], b"HELLO");
}

#[test]
fn upload_and_download_round_trip_and_a_short_upload_keeps_the_old_content() {
    let (st, dir) = running_pool("dir-upload");
    let pool = "dir-upload";
    st.create_volume(&volume(pool, "v", 8 * MIB, VolFormat::Raw))
        .expect("create");
    let content: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
    let n = st
        .upload_volume(
            pool,
            "v",
            &mut &content[..],
            Some(content.len() as u64),
            &no_progress,
        )
        .expect("upload");
    assert_eq!(n, content.len() as u64);
    let info = st.volume_info(pool, "v").expect("info");
    assert_eq!(
        info.capacity,
        8 * MIB,
        "a shorter raw upload keeps the size"
    );
    let mut out = Vec::new();
    st.download_volume(pool, "v", &mut out, &no_progress)
        .expect("download");
    assert_eq!(out.len() as u64, 8 * MIB);
    assert_eq!(&out[..content.len()], &content[..]);

    // The stream ends early: refused, and the volume is as it was.
    let e = st
        .upload_volume(pool, "v", &mut &b"short"[..], Some(1000), &no_progress)
        .expect_err("short");
    assert!(e.to_string().contains("5 of 1000"), "{e}");
    let now = std::fs::read(dir.join("v")).expect("read");
    assert_eq!(&now[..content.len()], &content[..]);
    assert!(!dir.join(".v.vireo-partial").exists());
}

#[test]
fn an_interrupted_fill_is_never_a_volume_and_the_next_attempt_completes() {
    let (st, dir) = running_pool("dir-crash");
    let pool = "dir-crash";
    // What a crash half way through a fill leaves behind.
    std::fs::write(dir.join(".disk.vireo-partial"), vec![1u8; 4096]).expect("write");
    st.refresh_pool(pool).expect("refresh");
    assert!(st.list_volumes(pool).expect("list").is_empty());
    let e = st.volume_info(pool, "disk").expect_err("not a volume");
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    st.create_volume(&volume(pool, "disk", 4 * MIB, VolFormat::Raw))
        .expect("create after the crash");
    assert!(!dir.join(".disk.vireo-partial").exists());
    assert_eq!(
        st.volume_info(pool, "disk").expect("info").capacity,
        4 * MIB
    );
}

#[test]
fn qcow2_headers_that_point_outside_the_pool_are_refused() {
    if !need_qemu_img("qcow2 backing outside the pool") {
        return;
    }
    let (st, dir) = running_pool("dir-evil");
    let pool = "dir-evil";
    // An image whose backing file is a host file, as an upload could bring.
    let evil = common::fresh_root("dir-evil-src").join("evil.qcow2");
    qemu_img::create_overlay(&evil, Path::new("/etc/hostname"), VolFormat::Raw, MIB)
        .expect("make the image");
    let bytes = std::fs::read(&evil).expect("read");
    st.create_volume(&volume(pool, "v", MIB, VolFormat::Raw))
        .expect("create");
    let e = st
        .upload_volume(pool, "v", &mut &bytes[..], None, &no_progress)
        .expect_err("refused");
    assert!(e.to_string().contains("/etc/hostname"), "{e}");
    assert_eq!(
        st.volume_info(pool, "v").expect("info").format,
        VolFormat::Raw,
        "the volume kept its content"
    );
    // The same image served by URL is refused too, and leaves nothing.
    let url = serve(bytes, None);
    let e = st
        .create_volume(&url_volume(pool, "w", 8 * MIB, VolFormat::Qcow2, &url))
        .expect_err("refused");
    assert!(e.to_string().contains("backing file"), "{e}");
    assert!(!dir.join("w").exists());
}

#[test]
fn pool_records_outlive_the_driver_and_a_second_driver_sees_them() {
    let root = common::fresh_root("dir-records");
    let pool = common::dir_pool("dir-records");
    let a = DirStorage::open(&root, Path::new("/")).expect("opens");
    a.define_pool(&pool).expect("define");
    a.start_pool("dir-records").expect("start");
    a.create_volume(&volume("dir-records", "v", MIB, VolFormat::Raw))
        .expect("create");
    drop(a);
    let b = DirStorage::open(&root, Path::new("/")).expect("opens again");
    let info = b.pool_info("dir-records").expect("info");
    assert_eq!(info.state, vireo_drivers::PoolState::Running);
    assert_eq!(b.list_volumes("dir-records").expect("list").len(), 1);
    b.delete_volume("dir-records", "v").expect("delete");
    b.destroy_pool("dir-records").expect("destroy");
    b.undefine_pool("dir-records").expect("undefine");
}

#[test]
fn host_root_re_roots_pool_paths() {
    let root = common::fresh_root("dir-hostroot");
    let host = root.join("node-a");
    let st = DirStorage::open(&root.join("state"), &host).expect("opens");
    let pool = StoragePool::new(
        "rooted",
        vireo_crds::StoragePoolSpec {
            uuid: None,
            pool_type: vireo_crds::PoolType::Dir,
            path: "/var/lib/vireo/images".into(),
            autostart: false,
            active: None,
            node_selector: None,
        },
    );
    st.define_pool(&pool).expect("define");
    st.build_pool("rooted").expect("build");
    assert!(host.join("var/lib/vireo/images").is_dir());
    st.start_pool("rooted").expect("start");
    let r = st
        .create_volume(&volume("rooted", "v", MIB, VolFormat::Raw))
        .expect("create");
    assert_eq!(
        r.path,
        host.join("var/lib/vireo/images/v").display().to_string()
    );
}

#[test]
fn a_volume_for_an_upload_waits_for_its_content() {
    let (st, dir) = running_pool("dir-await");
    let pool = "dir-await";
    let vol = with_source(
        volume(pool, "img", 4 * MIB, VolFormat::Raw),
        VolumeSource {
            upload: Some(vireo_crds::UploadSource {}),
            ..Default::default()
        },
    );
    st.create_volume(&vol).expect("create");
    let info = st.volume_info(pool, "img").expect("info");
    assert!(
        info.awaiting_upload,
        "a placeholder until an upload: {info:?}"
    );
    assert_eq!(info.upload_progress, None);
    // The marker is hidden: one volume in the pool, not two.
    let names: Vec<String> = st
        .list_volumes(pool)
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["img"]);

    // A broken upload leaves it waiting.
    st.upload_volume(pool, "img", &mut &b"short"[..], Some(1000), &no_progress)
        .expect_err("short");
    assert!(st.volume_info(pool, "img").expect("info").awaiting_upload);

    // While an upload runs, volume_info reports how far it is.
    let seen = Mutex::new(Vec::new());
    let content: Vec<u8> = (0..2 * MIB).map(|i| (i % 253) as u8).collect();
    let progress = |done: u64, _total: Option<u64>| {
        if done > 0
            && done < content.len() as u64
            && let Ok(i) = st.volume_info(pool, "img")
        {
            seen.lock().expect("lock").push(i.upload_progress);
        }
    };
    // Half a second a MiB, so that progress ticks (every 200 ms) come mid-way.
    struct Slow<'a>(&'a [u8]);
    impl Read for Slow<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len());
            std::thread::sleep(std::time::Duration::from_micros(500_000 * n as u64 / MIB));
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    st.upload_volume(
        pool,
        "img",
        &mut Slow(&content),
        Some(content.len() as u64),
        &progress,
    )
    .expect("upload");
    let seen = seen.into_inner().expect("lock");
    assert!(
        !seen.is_empty() && seen.iter().all(|p| p.is_some_and(|p| p < 100)),
        "{seen:?}"
    );
    let info = st.volume_info(pool, "img").expect("info");
    assert!(
        !info.awaiting_upload && info.upload_progress.is_none(),
        "{info:?}"
    );
    let data = std::fs::read(dir.join("img")).expect("read");
    assert_eq!(&data[..content.len()], &content[..]);

    // A new placeholder, deleted before any upload: nothing of it is left.
    st.create_volume(&with_source(
        volume(pool, "gone", MIB, VolFormat::Raw),
        VolumeSource {
            upload: Some(vireo_crds::UploadSource {}),
            ..Default::default()
        },
    ))
    .expect("create");
    st.delete_volume(pool, "gone").expect("delete");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .expect("pool dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("gone"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Bytes a file occupies on disk (st_blocks).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A 16 MiB + 777 byte raw image like a disk's: data, a MiB of written
/// zeros (allocated in the source), holes, and data in the unaligned
/// tail. Returns its path and the bytes of data it holds.
fn sparse_image(dir: &Path) -> (PathBuf, u64) {
    use std::os::unix::fs::FileExt;
    let path = dir.join("image.raw");
    let f = std::fs::File::create(&path).expect("create");
    let len = 16 * MIB + 777;
    f.set_len(len).expect("len");
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    f.write_all_at(&data, 0).expect("write");
    f.write_all_at(&vec![0u8; MIB as usize], 5 * MIB)
        .expect("write zeros");
    f.write_all_at(&data[..(MIB / 2 + 123) as usize], 9 * MIB)
        .expect("write");
    f.write_all_at(b"the tail", len - 8).expect("write");
    f.sync_all().expect("sync");
    // Data (what a copy needs; the written zeros are holes in copies):
    // 1 MiB, 0.5 MiB and a bit, the tail's block.
    (path, MIB + MIB / 2 + 4096 + 4096)
}

/// What a copy may hold on disk beyond the data: blocks rounded up to the
/// filesystem's, a little metadata.
const SLACK: u64 = 256 << 10;

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read") == std::fs::read(b).expect("read")
}

#[test]
fn file_uploads_downloads_and_clones_are_exact_and_keep_holes() {
    let (st, dir) = running_pool("dir-sparse");
    let pool = "dir-sparse";
    let outside = common::fresh_root("dir-sparse-files");
    let (image, data) = sparse_image(&outside);
    st.create_volume(&volume(pool, "v", 4 * MIB, VolFormat::Raw))
        .expect("create");

    // Upload from a file: the same bytes, the holes (and the written
    // zeros) not allocated.
    let n = st
        .upload_volume_from_file(
            pool,
            "v",
            &std::fs::File::open(&image).expect("open"),
            &no_progress,
        )
        .expect("upload");
    assert_eq!(n, 16 * MIB + 777);
    assert!(same_bytes(&image, &dir.join("v")), "upload differs");
    let alloc = allocated(&dir.join("v"));
    assert!(alloc <= data + SLACK, "upload not sparse: {alloc} > {data}");
    assert!(!dir.join(".v.vireo-partial").exists());

    // Download into a file, new or holding something already.
    for (what, before) in [("new", &b""[..]), ("non-empty", &[7u8; 100_000][..])] {
        let down = outside.join(format!("down-{what}"));
        std::fs::write(&down, before).expect("write");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&down)
            .expect("open");
        let n = st
            .download_volume_to_file(pool, "v", &f, &no_progress)
            .expect("download");
        drop(f);
        assert_eq!(n, 16 * MIB + 777);
        assert!(
            same_bytes(&image, &down),
            "download into a {what} file differs"
        );
        let alloc = allocated(&down);
        assert!(alloc <= data + SLACK, "download not sparse: {alloc}");
    }

    // The stream download gives the same bytes, holes read as zeros.
    let mut streamed = Vec::new();
    st.download_volume(pool, "v", &mut streamed, &no_progress)
        .expect("download");
    assert!(streamed == std::fs::read(&image).expect("read"));

    // A full clone, bigger than its source.
    let clone = with_source(
        volume(pool, "c", 20 * MIB, VolFormat::Raw),
        VolumeSource {
            clone: Some(CloneSource {
                volume: "v".into(),
                overlay: false,
            }),
            ..VolumeSource::default()
        },
    );
    st.create_volume(&clone).expect("clone");
    let c = std::fs::read(dir.join("c")).expect("read");
    let src = std::fs::read(&image).expect("read");
    assert_eq!(c.len() as u64, 20 * MIB);
    assert!(c[..src.len()] == src[..] && c[src.len()..].iter().all(|b| *b == 0));
    let alloc = allocated(&dir.join("c"));
    assert!(alloc <= data + SLACK, "clone not sparse: {alloc}");

    // A clone onto an existing name: refused, and the volume there is
    // untouched.
    let onto = with_source(
        volume(pool, "v", 20 * MIB, VolFormat::Raw),
        clone.spec.source.clone().expect("source"),
    );
    let e = st.create_volume(&onto).expect_err("exists");
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
    assert!(same_bytes(&image, &dir.join("v")));

    // Download of a volume that is not there: an error, the file as it was.
    let keep = outside.join("keep");
    std::fs::write(&keep, b"keep me").expect("write");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&keep)
        .expect("open");
    let e = st
        .download_volume_to_file(pool, "nope", &f, &no_progress)
        .expect_err("no volume");
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert_eq!(std::fs::read(&keep).expect("read"), b"keep me");
}

/// Runs qemu-img and says whether it succeeded (its output on failure).
fn qemu_img_ok(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn qcow2_uploads_and_clones_by_file_copy_stay_valid_and_sparse() {
    if !need_qemu_img("qcow2 file copies") {
        return;
    }
    let (st, dir) = running_pool("dir-qcopy");
    let pool = "dir-qcopy";
    let outside = common::fresh_root("dir-qcopy-files");
    let (raw, _) = sparse_image(&outside);
    let image = outside.join("image.qcow2");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    qemu_img_ok(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&image)]).expect("convert");

    st.create_volume(&volume(pool, "q", MIB, VolFormat::Qcow2))
        .expect("create");
    st.upload_volume_from_file(
        pool,
        "q",
        &std::fs::File::open(&image).expect("open"),
        &no_progress,
    )
    .expect("upload");
    let q = dir.join("q");
    assert!(same_bytes(&image, &q), "upload differs");
    qemu_img_ok(&["check", "-q", "-f", "qcow2", &s(&q)]).expect("the upload is valid");
    let info = st.volume_info(pool, "q").expect("info");
    let capacity = vireo_drivers::storage::dir::file::probe(&image)
        .expect("probe")
        .capacity;
    assert_eq!((info.format, info.capacity), (VolFormat::Qcow2, capacity));

    // A full clone, 32 MiB: a copy of the file, then grown by qemu-img.
    let clone = |name: &str, from: &str, capacity: u64| {
        with_source(
            volume(pool, name, capacity, VolFormat::Qcow2),
            VolumeSource {
                clone: Some(CloneSource {
                    volume: from.into(),
                    overlay: false,
                }),
                ..VolumeSource::default()
            },
        )
    };
    st.create_volume(&clone("c", "q", 32 * MIB)).expect("clone");
    let c = dir.join("c");
    qemu_img_ok(&["check", "-q", "-f", "qcow2", &s(&c)]).expect("the clone is valid");
    // Same guest-visible bytes as the raw image (the grown part reads as
    // zeros; `compare` allows a size difference only if it is zeros).
    qemu_img_ok(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &s(&raw),
        &s(&c),
    ])
    .expect("the clone has the image's content");
    assert_eq!(st.volume_info(pool, "c").expect("info").capacity, 32 * MIB);
    let (a, b) = (allocated(&image), allocated(&c));
    assert!(b <= a + SLACK, "clone not sparse: {b} > {a}");

    // Download into a file: the same image, sparse.
    let down = outside.join("down.qcow2");
    let f = std::fs::File::create(&down).expect("create");
    st.download_volume_to_file(pool, "q", &f, &no_progress)
        .expect("download");
    drop(f);
    assert!(same_bytes(&image, &down));
    assert!(allocated(&down) <= a + SLACK);

    // The clone of an overlay is flattened (no backing file), as before.
    let overlay = with_source(
        volume(pool, "o", 17 * MIB, VolFormat::Qcow2),
        VolumeSource {
            clone: Some(CloneSource {
                volume: "q".into(),
                overlay: true,
            }),
            ..VolumeSource::default()
        },
    );
    st.create_volume(&overlay).expect("overlay");
    st.create_volume(&clone("flat", "o", 17 * MIB))
        .expect("flatten");
    let flat = dir.join("flat");
    let p = vireo_drivers::storage::dir::file::probe(&flat).expect("probe");
    assert_eq!(p.backing, None, "the clone of an overlay stands alone");
    qemu_img_ok(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &s(&raw),
        &s(&flat),
    ])
    .expect("the flattened clone has the image's content");

    // An upload of an image whose backing file is outside the pool is
    // refused, from a file too: the volume keeps its content, and no
    // partial file stays.
    let evil = outside.join("evil.qcow2");
    qemu_img::create_overlay(&evil, Path::new("/etc/hostname"), VolFormat::Raw, MIB)
        .expect("make the image");
    let e = st
        .upload_volume_from_file(
            pool,
            "c",
            &std::fs::File::open(&evil).expect("open"),
            &no_progress,
        )
        .expect_err("refused");
    assert!(e.to_string().contains("/etc/hostname"), "{e}");
    qemu_img_ok(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &s(&raw),
        &s(&c),
    ])
    .expect("the volume kept its content");
    assert!(!dir.join(".c.vireo-partial").exists());
}
