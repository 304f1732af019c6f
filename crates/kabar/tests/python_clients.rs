//! A client library written by others in another language against the real
//! binary: matrix-nio (Python), which checks every response against its own
//! JSON schemas. Its strictness is what found nulls where strings belong.
//!
//! matrix-nio is installed with pip into a virtual environment under the
//! target directory the first time (the test needs Python 3 with `venv`
//! and the PyPI registry, as CI has).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::Server;

/// The matrix-nio release the smoke test is written against.
const NIO: &str = "matrix-nio==0.26.0";

/// A Python with matrix-nio, from a virtual environment made once.
fn nio_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nio-venv");
    let python = venv.join("bin").join("python");
    let ready = || Command::new(&python).args(["-c", "import nio"]).status().is_ok_and(|s| s.success());
    if ready() {
        return python;
    }
    let made = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .expect("run python3");
    assert!(made.success(), "python3 -m venv failed");
    let installed = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", NIO])
        .status()
        .expect("run pip");
    assert!(installed.success(), "pip install {NIO} failed");
    assert!(ready(), "matrix-nio does not import after installing it");
    python
}

#[test]
fn matrix_nio_accepts_every_answer_of_a_chat() {
    let python = nio_python();
    let server = Server::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/nio_smoke.py");
    let mut child = Command::new(python)
        .arg("-u")
        .arg(script)
        .arg(&server.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the nio smoke test");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "matrix-nio refused an answer:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok logout"), "every step ran:\n{stdout}");
}
