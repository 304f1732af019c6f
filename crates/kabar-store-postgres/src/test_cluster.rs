//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` and
//! `pg_ctl` from the installed server (Debian's `postgresql` package), in a
//! temporary directory, listening on a free loopback port. Stopped (and its
//! files removed) when dropped.
//!
//! PostgreSQL refuses to run as root; as root the cluster runs as the
//! `postgres` system user the Debian package creates.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

/// A running cluster; the database user `kabar` may do anything, without a password.
pub struct TestCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some("postgres")` when the server must run as that user.
    run_as: Option<String>,
}

fn find_bin_dir() -> io::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
            // A link on PATH leads to the directory with all of the server's programs.
            let real = std::fs::canonicalize(dir.join("pg_ctl"))?;
            return Ok(real.parent().map(Path::to_path_buf).unwrap_or(dir));
        }
    }
    // Debian keeps the server's programs out of PATH, one directory per version.
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions.into_iter().rev().find(|d| d.join("pg_ctl").is_file()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "PostgreSQL's pg_ctl and initdb were not found (install Debian's postgresql package)",
        )
    })
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    // Without libc: the effective uid is in /proc (Linux, where tests run).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        .unwrap_or(false)
}

impl TestCluster {
    /// A cluster tuned for tests: no fsync (the tests kill Kabar, never the
    /// machine).
    pub fn start() -> io::Result<Self> {
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("kabar-pg-").tempdir()?;
        let run_as = is_root().then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            let status = Command::new("chown").arg("-R").arg(user).arg(dir.path()).status()?;
            if !status.success() {
                return Err(io::Error::other("could not hand the cluster directory to the postgres user"));
            }
        }
        let cluster = Self {
            dir,
            bin,
            port: free_port()?,
            run_as,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "kabar",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<()> {
        let path = self.bin.join(program);
        let output = match &self.run_as {
            Some(user) => Command::new("runuser")
                .arg("-u")
                .arg(user)
                .arg("--")
                .arg(&path)
                .args(args)
                .output()?,
            None => Command::new(&path).args(args).output()?,
        };
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
            self.port,
            self.dir.path().display(),
        );
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop(&self) -> io::Result<()> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"])
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self) -> io::Result<()> {
        self.pg_ctl_start()
    }

    /// The URL of database `name` (see [`create_database`](Self::create_database)).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://kabar@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> io::Result<String> {
        let port = self.port.to_string();
        self.run("createdb", &["-h", "127.0.0.1", "-p", &port, "-U", "kabar", name])?;
        Ok(self.url(name))
    }

    /// Everything database `name` holds, as `pg_dump` writes it.
    pub fn dump(&self, name: &str) -> io::Result<Vec<u8>> {
        let output = Command::new(self.bin.join("pg_dump"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "kabar", "--data-only", name])
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        Ok(output.stdout)
    }
}

static SHARED: std::sync::OnceLock<Result<TestCluster, String>> = std::sync::OnceLock::new();

impl TestCluster {
    /// One cluster for the whole test process, started on first use. A
    /// watchdog stops it and removes its files when the process has exited
    /// (a static is never dropped).
    pub fn shared() -> Result<&'static TestCluster, String> {
        SHARED
            .get_or_init(|| {
                let cluster = Self::start().map_err(|e| e.to_string())?;
                cluster.watch_process(std::process::id()).map_err(|e| e.to_string())?;
                Ok(cluster)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn watch_process(&self, pid: u32) -> io::Result<()> {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 0.5; done; {pg_ctl} -D {data} -m immediate -w stop >/dev/null 2>&1; rm -rf {dir}",
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data_dir().display(),
            dir = self.dir.path().display(),
        );
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg("sh").arg("-c").arg(&script);
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(&script);
                c
            }
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(())
    }

    /// Creates database `name` unless it exists, and returns its URL.
    pub fn ensure_database(&self, name: &str) -> io::Result<String> {
        match self.create_database(name) {
            Ok(url) => Ok(url),
            Err(e) if e.to_string().contains("already exists") => Ok(self.url(name)),
            Err(e) => Err(e),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
