//! Downloads against a local HTTP server on 127.0.0.1 serving generated archives: success,
//! no repeated work, checksum mismatch, a transfer cut short, and an HTTP error.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::cifar10_targz;
use dnal_data::{Archive, CifarKind, DataError, Split, download, load_cifar_sized};
use md5::{Digest, Md5};

/// What the server answers.
#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    /// Announces the full length, sends half, closes.
    CutShort(Vec<u8>),
    NotFound,
}

/// Serves `reply` to every request; returns the base URL and a request counter.
fn serve(reply: Reply) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = match &reply {
                Reply::Body(b) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(b)),
                Reply::CutShort(b) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(&b[..b.len() / 2])),
                Reply::NotFound => stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    (format!("http://{addr}/cifar-10-binary.tar.gz"), count)
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn archive_for(url: &str, md5: &str) -> Archive {
    let md5: &'static str = Box::leak(md5.to_string().into_boxed_str());
    Archive {
        md5,
        ..Archive::cifar(CifarKind::Cifar10).with_url(url)
    }
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn official_checksums_are_the_published_ones() {
    assert_eq!(
        Archive::cifar(CifarKind::Cifar10).md5,
        "c32a1d4ab5d03f1284b67883e8d87530"
    );
    assert_eq!(
        Archive::cifar(CifarKind::Cifar100).md5,
        "03b5dce01913d631647c71ecec9e9cb8"
    );
}

#[test]
fn downloads_verifies_extracts_and_skips_done_work() {
    let body = cifar10_targz(10);
    let (url, count) = serve(Reply::Body(body.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let archive = archive_for(&url, &md5_hex(&body));
    let folder = download(&archive, tmp.path()).unwrap();
    assert_eq!(folder, tmp.path().join("cifar-10-batches-bin"));
    let set = load_cifar_sized(CifarKind::Cifar10, tmp.path(), Split::Train, 10).unwrap();
    assert_eq!(set.len(), 50);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Everything is done: no request.
    download(&archive, tmp.path()).unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // The extracted folder is gone but the verified archive is there: extract again, no request.
    std::fs::remove_dir_all(&folder).unwrap();
    download(&archive, tmp.path()).unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(folder.join("data_batch_1.bin").exists());
    let mut names = leftovers(tmp.path());
    names.sort();
    assert_eq!(names, ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]);
}

#[test]
fn a_checksum_mismatch_leaves_nothing_behind() {
    let body = cifar10_targz(10);
    let (url, _) = serve(Reply::Body(body));
    let tmp = tempfile::tempdir().unwrap();
    let err = download(
        &archive_for(&url, "00000000000000000000000000000000"),
        tmp.path(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Checksum {
                algorithm: "md5",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was kept"), "{err}");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn a_transfer_cut_short_leaves_nothing_behind() {
    let body = cifar10_targz(10);
    let md5 = md5_hex(&body);
    let (url, _) = serve(Reply::CutShort(body));
    let tmp = tempfile::tempdir().unwrap();
    let err = download(&archive_for(&url, &md5), tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Download { .. }), "{err}");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn an_http_error_names_the_address() {
    let (url, _) = serve(Reply::NotFound);
    let tmp = tempfile::tempdir().unwrap();
    let msg = download(&archive_for(&url, "x"), tmp.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
    assert!(leftovers(tmp.path()).is_empty());
}

#[test]
fn a_corrupt_archive_with_the_right_checksum_is_not_extracted() {
    // A mirror serving a file whose published checksum matches but whose content is not a
    // tar.gz (e.g. an HTML page registered by mistake).
    let body = b"<html>not an archive</html>".to_vec();
    let (url, _) = serve(Reply::Body(body.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let msg = download(&archive_for(&url, &md5_hex(&body)), tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cifar-10-binary.tar.gz") && msg.contains("extract"),
        "{msg}"
    );
    assert!(!tmp.path().join("cifar-10-batches-bin").exists());
}
