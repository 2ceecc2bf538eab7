//! Helpers shared by the integration tests that run the real `oncepay` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `oncepay serve` process, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// Starts `oncepay serve --listen 127.0.0.1:0` with `args` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_oncepay"));
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if std::env::var_os("TEST_LOG").is_some() {
            command.stderr(Stdio::inherit()).env("ONCEPAY_LOG", "debug");
        } else {
            command.stderr(Stdio::null());
        }
        let mut child = command.spawn().expect("the oncepay binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (found, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("oncepay listening on ") {
                    let _ = found.send(url.trim().to_owned());
                }
            }
        });
        let url = match listening.recv_timeout(START_TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("oncepay did not start listening within {START_TIMEOUT:?}");
            }
        };
        Server { child, url }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client for tests, with a timeout so no test can hang on a dead server.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client builds")
}

/// A fresh random idempotency key with a readable prefix.
pub fn fresh_key(prefix: &str) -> String {
    format!("{prefix}-{}", oncepay::ids::new_id("k"))
}
